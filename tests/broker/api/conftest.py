from tests.brokerserver import any_broker, sqlite_broker  # noqa: F401 - fixtures
from tests.pkifixtures import grid_pki  # noqa: F401 - fixture
