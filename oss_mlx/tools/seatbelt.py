"""The macOS Seatbelt profile of the python tool's worker (run under /usr/bin/sandbox-exec).

Closed by default, as the Codex CLI's base policy is: what is not allowed below is refused by
the kernel (EPERM), for the worker and for good (docs/harmony.md §5.10).

  * files: read (and map) the read-only roots (the Python installation, the system's libraries
    and frameworks); read and write the working folder; write /dev/null. Nothing else: not the
    user's home, not other folders. File *metadata* (stat: existence, size, times) stays
    readable everywhere, because dyld and Python's import system stat their way up paths.
  * network: no rule allows it (no `network*`): every socket connect/bind is refused, local
    ones included.
  * processes: no fork (so no fork bomb, no subprocess), exec of the Python binary only (that
    is sandbox-exec starting the worker), signals and process info for itself only.
  * sysctl reads (CPU count, page size: numpy and Python ask) and nothing of mach/IPC services.

Not testable on Linux beyond its text: tests/tools check what it says, not what macOS does.
"""

from __future__ import annotations

# System locations a macOS process needs to start Python and load libraries; none holds user
# data. /private/var/db/dyld: the shared cache on older macOS; timezone: localtime.
SYSTEM_READ = (
    "/System",
    "/usr/lib",
    "/usr/share",
    "/Library/Frameworks",
    "/Library/Developer/CommandLineTools/Library/Frameworks",
    "/Library/Developer/CommandLineTools/usr/lib",
    "/Applications/Xcode.app/Contents/Developer/Library/Frameworks",
    "/opt/homebrew",
    "/usr/local",
    "/private/var/db/dyld",
    "/private/var/db/timezone",
    "/private/etc/localtime",
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
)


def _quote(path: str) -> str:
    """A path as an SBPL string literal."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _filters(paths) -> str:
    return "\n".join(f"  (subpath {_quote(p)})" for p in paths)


def profile(read_roots, workdir: str, python: str) -> str:
    """The SBPL profile. read_roots, workdir, python: real paths (macOS resolves /var to
    /private/var and /tmp to /private/tmp before it matches, so symlinked paths never match)."""
    reads = list(dict.fromkeys([*SYSTEM_READ, *read_roots]))
    return f"""(version 1)
(deny default)
(allow process-exec (literal {_quote(python)}))
(allow signal (target self))
(allow process-info* (target self))
(allow sysctl-read)
(allow file-read-metadata)
(allow file-read* file-map-executable
{_filters(reads)})
(allow file-read* file-write*
  (subpath {_quote(workdir)}))
(allow file-write-data (literal "/dev/null"))
"""
