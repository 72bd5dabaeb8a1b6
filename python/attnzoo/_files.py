"""Writing files so that a reader (or a resumed run) never sees half of one."""
import os


def atomic_write(path: str, write, suffix: str = "") -> None:
    """Calls write(tmp) for a temporary file beside `path` (named with `suffix`
    last, for writers that go by the extension), flushes it to disk and
    renames it over `path`. The temporary file is removed if writing fails."""
    tmp = f"{path}.tmp.{os.getpid()}{suffix}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:  # name the file the caller asked for, not the temporary one
        raise type(error)(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)
