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


def load_safetensors(path, device: str = "cpu") -> dict:
    """safetensors.torch.load_file(path), except that a damaged or hostile
    file is a ValueError naming it: the C++ reader's own diagnosis
    (csrc/attnzoo/io, which checks every length, offset, dtype and shape), or
    safetensors' words for a fault the C++ reader does not refuse. A missing
    file stays the OSError it is (it names the path already)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        return load_file(path, device=device)
    except SafetensorError as error:
        raise ValueError(_safetensors_fault(path, str(error))) from error


def _safetensors_fault(path: str, detail: str) -> str:
    """"<path>: what is wrong" for a file safetensors refused. Only reached on
    a damaged file, so the second read costs nothing in normal use."""
    from . import _C

    try:
        _C.load_safetensors(path)
    except ValueError as cpp_error:  # the C++ reader's message starts with the path
        return str(cpp_error)
    return f"{path}: {detail.replace('Error while deserializing header: ', '')}"
