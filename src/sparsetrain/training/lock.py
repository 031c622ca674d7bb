"""One writer per run folder. A training run holds an exclusive `flock` on RUN/.lock for its whole life (under torchrun:
the rank-0 process, for its launch). The operating system releases the lock when the holder dies, kill -9 included, so
a lock left by a dead process is taken over without any staleness guess; a second writer is refused at once, before it
writes anything, with the holder's pid in the message."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sparsetrain.errors import UserError

LOCK = ".lock"


class RunLock:
    """`with RunLock(run_dir):` holds the run folder; creates the folder if needed and removes it again on the way
    out when the run wrote nothing into it."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "RunLock":
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.run_dir} is in use by a running training ({holder}); wait for it to finish or "
                            "choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        # The file stays (unlinking it could let two processes lock two different files); only the lock goes.
        os.close(self.fd)
        self.fd = None
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            (self.run_dir / LOCK).unlink()
            self.run_dir.rmdir()  # an error before any work leaves no folder behind
