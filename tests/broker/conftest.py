from tests.pkifixtures import grid_pki  # noqa: F401 - fixture
