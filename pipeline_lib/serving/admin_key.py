"""The admin key that guards Triton's model-repository API (load, unload, upload of model files).

Triton 2.51 restricts an API category to requests carrying one header with one value
(``--http-restricted-api`` / ``--grpc-restricted-protocol``); it has no option file and reads no
environment variable for it, so the value would sit in ``tritonserver``'s command line, which every
local user can read (``ps``, ``/proc/PID/cmdline``). Here:

* a fresh random key is generated for each server (unless ``serving.admin_api_key`` or
  ``RECSYS_ADMIN_KEY`` sets one) and written to a file only the user can read (0600, in a 0700
  folder, see :func:`key_path`), where the project's own ``recsys promote``/``rollback`` and the
  pipeline's publish step find it;
* ``tritonserver``'s argv holds a placeholder; a tiny ``LD_PRELOAD`` library (:data:`SHIM_SOURCE`,
  compiled once with the system C compiler into the cache folder) swaps the placeholder for the key
  (read from an environment variable, then wiped) before Triton's ``main`` parses its options. The
  kernel's copy of the command line -- what ``ps`` shows -- keeps the placeholder;
* without a C compiler the key is passed in argv and overwritten there through ``/proc/PID/mem``
  as soon as Triton answers (it copied its options by then): visible for well under a second. A
  warning says so.

One header name for HTTP and gRPC, :data:`ADMIN_HEADER`: Triton looks for gRPC metadata named
``triton-grpc-protocol-<key>``, so the HTTP rule uses that full name and the gRPC rule its suffix.
A refused call answers HTTP 403; over gRPC Triton 2.51 answers ``UNAVAILABLE`` with "This protocol
is restricted, expecting header ..." (its own choice of status code, not configurable).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

GRPC_KEY = "recsys-admin-key"  # what --grpc-restricted-protocol names; Triton checks the prefixed metadata
ADMIN_HEADER = f"triton-grpc-protocol-{GRPC_KEY}"  # the one header / metadata name clients send
PLACEHOLDER = "@RECSYS_ADMIN_KEY@"
KEY_ENV = "RECSYS_TRITON_ADMIN_KEY"  # read (and wiped) by the shim inside tritonserver only

SHIM_SOURCE = r"""
/* LD_PRELOAD shim for tritonserver (pipeline_lib/serving/admin_key.py): replaces the placeholder
   in argv with the key from the environment before main() runs, wipes the key from the
   environment and drops itself from LD_PRELOAD so child processes (python stubs) do not load it. */
#include <stdlib.h>
#include <string.h>
static void recsys_argv_key(int argc, char **argv, char **envp) {
    (void)envp;
    char *key = getenv("RECSYS_TRITON_ADMIN_KEY");
    if (key == NULL) return;
    const char *ph = "@RECSYS_ADMIN_KEY@";
    size_t kl = strlen(key), pl = strlen(ph);
    for (int i = 1; i < argc; i++) {
        char *at = strstr(argv[i], ph);
        if (at == NULL) continue;
        size_t pre = (size_t)(at - argv[i]);
        char *s = malloc(strlen(argv[i]) - pl + kl + 1);
        if (s == NULL) continue;
        memcpy(s, argv[i], pre);
        memcpy(s + pre, key, kl);
        strcpy(s + pre + kl, at + pl);
        argv[i] = s;
    }
    memset(key, 'x', kl);
    unsetenv("RECSYS_TRITON_ADMIN_KEY");
    unsetenv("LD_PRELOAD");
}
__attribute__((used, section(".init_array"))) static void (*recsys_init)(int, char **, char **) = recsys_argv_key;
"""


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_CACHE_DIR", Path.home() / ".cache" / "recsys-pipeline"))


def state_dir() -> Path:
    """The serving state folder (0700): one key file per running server."""
    d = cache_dir() / "serving"
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def key_path(host: str, http_port: int) -> Path:
    """Where the key of the server listening on ``host:http_port`` is kept."""
    return state_dir() / f"admin-key-{host}-{http_port}"


def new_key() -> str:
    return secrets.token_urlsafe(32)


def write_key(path: Path, key: str) -> None:
    """Write ``key`` readable and writable by the user only (created 0600, never wider)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.encode())
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def read_key(host: str, http_port: int) -> Optional[str]:
    try:
        return key_path(host, http_port).read_text().strip() or None
    except OSError:
        return None


def shim_library() -> Optional[Path]:
    """The compiled shim (built once per source version), or None when no C compiler is available."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    lib = cache_dir() / f"triton-argv-key-{digest}.so"
    if lib.exists():
        return lib
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        return None
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "argv_key.c"
        src.write_text(SHIM_SOURCE)
        out = Path(tmp) / "argv_key.so"
        res = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            log.warning("could not compile the admin-key shim (%s); the key is scrubbed from argv after start",
                        res.stderr.strip()[-300:])
            return None
        tmp_lib = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        shutil.copyfile(out, tmp_lib)
        os.replace(tmp_lib, lib)
    return lib


def restricted_api_args(key_in_argv: Optional[str]) -> list[str]:
    """Triton flags restricting the model-repository API; the key is ``key_in_argv`` or the placeholder."""
    value = key_in_argv or PLACEHOLDER
    return [f"--http-restricted-api=model-repository:{ADMIN_HEADER}={value}",
            f"--grpc-restricted-protocol=model-repository:{GRPC_KEY}={value}"]


def scrub_argv(pid: int, key: str) -> bool:
    """Overwrite ``key`` in process ``pid``'s command line (its memory; same user). -> whether it was found."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(arg_start)
            args = mem.read(arg_end - arg_start)
            needle, found = key.encode(), False
            at = args.find(needle)
            while at >= 0:
                mem.seek(arg_start + at)
                mem.write(b"x" * len(needle))
                found, at = True, args.find(needle, at + 1)
            return found
    except (OSError, ValueError, IndexError) as exc:
        log.warning("could not scrub the admin key from tritonserver's command line: %s", exc)
        return False
