/*
 * broker-pilot launcher: the statically linked entry point HTCondor's starter runs
 * as USER_JOB_WRAPPER (see docs/htcondor.md, "Threat model").
 *
 * The starter builds this program's environment from STARTER_JOB_ENVIRONMENT and
 * then lets the job's own Environment override it, so every variable here may
 * come from the job. A dynamically linked program (python, sh, env) would let the
 * loader act on LD_PRELOAD and friends before its first line runs; this one is
 * linked statically, so nothing of the job's runs before main() below.
 *
 *  1. If a variable that makes glibc, the dynamic loader or OpenSSL load code or
 *     data from a path of the caller's choosing is set, refuse: exit 202 with one
 *     sentence on stderr and in $_CONDOR_WRAPPER_ERROR_FILE. Nothing is run.
 *  2. Drop TMPDIR/TMP/TEMP (the starter points them into the job's scratch
 *     directory), SSL_CERT_FILE/SSL_CERT_DIR/CTLOG_FILE (OpenSSL would add the
 *     job's CA to the pilot's trust for the broker connection) and TZ (a path
 *     to a zone file of the job's). Jobs set these for their payload, which gets
 *     its environment from the job ad through the pilot, so they are removed
 *     here rather than refused.
 *  3. exec PILOT_PYTHON -I -m payload_wrapper.pilot --launcher-config=PILOT_CONFIG
 *     ARGS... with argv[0] the interpreter's absolute path (a bare name would make
 *     Python search the job's PATH to find its prefix). -I: no PYTHON* variables,
 *     no user site, no script or working directory on sys.path. The first
 *     argument is always the launcher's own (PILOT_CONFIG may be empty), so the
 *     job's Cmd can never stand in its place.
 *
 * PILOT_PYTHON and PILOT_CONFIG are fixed at build time: scripts/build-pilot-launcher
 * or broker-pilot [--config FILE] --install-launcher DEST.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef PILOT_PYTHON
#error "build with -DPILOT_PYTHON='\"/path/to/venv/bin/python\"' (scripts/build-pilot-launcher)"
#endif

#ifndef PILOT_CONFIG
#define PILOT_CONFIG ""
#endif

#define EXIT_SYSTEM 202
#define PREFIX "broker-pilot: the job was not started: "

extern char **environ;

/* Prefixes of names that change how the loader, glibc's allocator or OpenSSL start. */
static const char *const refused_prefixes[] = {
    "LD_", "MALLOC_", "GLIBC_", "GCONV_", "OPENSSL_", "DYLD_", "_RLD", NULL,
};

/* glibc's list of variables it ignores for set-user-ID programs, plus a few more
 * that point a library at a file of the caller's choosing. */
static const char *const refused_names[] = {
    "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "NIS_PATH", "NLSPATH",
    "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR", "SSLKEYLOGFILE", "KRB5_CONFIG",
    NULL,
};

/* Removed from the pilot's environment, never refused (see step 2 above). */
static const char *const dropped_names[] = {
    "TMPDIR", "TMP", "TEMP", "SSL_CERT_FILE", "SSL_CERT_DIR", "CTLOG_FILE", "TZ", NULL,
};

static size_t name_length(const char *entry)
{
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

static int name_is(const char *entry, size_t len, const char *name)
{
    return strlen(name) == len && strncmp(entry, name, len) == 0;
}

static int is_refused(const char *entry, size_t len)
{
    for (const char *const *p = refused_prefixes; *p; p++) {
        size_t n = strlen(*p);
        if (len >= n && strncmp(entry, *p, n) == 0)
            return 1;
    }
    for (const char *const *p = refused_names; *p; p++)
        if (name_is(entry, len, *p))
            return 1;
    return 0;
}

static int is_dropped(const char *entry, size_t len)
{
    for (const char *const *p = dropped_names; *p; p++)
        if (name_is(entry, len, *p))
            return 1;
    return 0;
}

static void put(int fd, const char *text, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        text += n;
        len -= (size_t)n;
    }
}

/* Append the line to $_CONDOR_WRAPPER_ERROR_FILE, which the job may have aimed
 * anywhere: never through a symlink, never into anything but a regular file with
 * one link that is new or still empty, never blocking on a FIFO. */
static void to_error_file(const char *line, size_t len)
{
    const char *path = getenv("_CONDOR_WRAPPER_ERROR_FILE");
    struct stat st;
    if (path == NULL || *path == '\0')
        return;
    if (lstat(path, &st) == 0 && (!S_ISREG(st.st_mode) || st.st_nlink != 1 || st.st_size != 0)) {
        static const char note[] = "broker-pilot: not writing to the wrapper error file: "
                                   "it is not a new or empty regular file\n";
        put(2, note, sizeof note - 1);
        return;
    }
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY
                            | O_CLOEXEC, 0644);
    if (fd < 0) {
        static const char note[] = "broker-pilot: cannot open the wrapper error file\n";
        put(2, note, sizeof note - 1);
        return;
    }
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1 && st.st_size == 0)
        put(fd, line, len);
    close(fd);
}

static void refuse(const char *message, const char *entry, size_t len) __attribute__((noreturn));

static void refuse(const char *message, const char *entry, size_t len)
{
    char line[512];
    size_t at = 0;
    const char *parts[] = {PREFIX, message, NULL};
    for (int i = 0; parts[i]; i++) {
        size_t n = strlen(parts[i]);
        if (n > sizeof line - at - 200)
            n = sizeof line - at - 200;
        memcpy(line + at, parts[i], n);
        at += n;
    }
    if (entry != NULL) {
        /* The name is the job's: copy only name characters, at most 64 of them. */
        if (len > 64)
            len = 64;
        for (size_t i = 0; i < len; i++) {
            char c = entry[i];
            int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')
                     || c == '_';
            line[at++] = ok ? c : '?';
        }
        static const char tail[] =
            ", which would make the loader, glibc or OpenSSL load code or data chosen by the "
            "job into the pilot before it can check anything; remove it from the job's "
            "environment (or the node's STARTER_JOB_ENVIRONMENT)";
        size_t n = sizeof tail - 1;
        if (n > sizeof line - at - 2)
            n = sizeof line - at - 2;
        memcpy(line + at, tail, n);
        at += n;
    }
    line[at++] = '\n';
    put(2, line, at);
    to_error_file(line, at);
    _exit(EXIT_SYSTEM);
}

int main(int argc, char **argv)
{
    for (char **e = environ; e && *e; e++) {
        size_t len = name_length(*e);
        if (is_refused(*e, len))
            refuse("the environment sets ", *e, len);
    }
    /* Compact the environment in place, without the dropped names. */
    char **out = environ;
    for (char **e = environ; e && *e; e++)
        if (!is_dropped(*e, name_length(*e)))
            *out++ = *e;
    if (out)
        *out = NULL;

    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (args == NULL)
        refuse("out of memory in the pilot launcher", NULL, 0);
    args[0] = (char *)PILOT_PYTHON;
    args[1] = (char *)"-I";
    args[2] = (char *)"-m";
    args[3] = (char *)"payload_wrapper.pilot";
    args[4] = (char *)"--launcher-config=" PILOT_CONFIG;
    for (int i = 1; i < argc; i++)
        args[i + 4] = argv[i];
    args[argc + 4] = NULL;
    execve(PILOT_PYTHON, args, environ);
    refuse("the pilot's interpreter " PILOT_PYTHON " cannot be started (rebuild the launcher "
           "with scripts/build-pilot-launcher after moving the installation)", NULL, 0);
}
