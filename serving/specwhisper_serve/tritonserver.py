"""Find (or fetch) a real ``tritonserver`` binary with the Python backend, start it, wait until ready.

In an NGC ``tritonserver`` container the system binary (``/opt/tritonserver``) is used. Elsewhere
the binary that the ``nvidia-pytriton`` wheel bundles is used directly on our model repository:
only its files are taken (extracted into the user cache), not PyTriton's Python API, so none of
that wheel's Python requirements (it pins numpy < 2) enter the environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from specwhisper_export.cache import cache_root

PYTRITON_WHEEL = ("nvidia-pytriton", "0.7.0")
SYSTEM_ROOT = Path("/opt/tritonserver")


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path  # holds python/ with libtriton_python.so, its utils and the stub
    library_path: tuple[Path, ...] = ()


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _fetch_pytriton() -> TritonInstall:
    """Extract the binary, its libraries and the Python backend for this Python from the wheel."""
    name, version = PYTRITON_WHEEL
    root = cache_root() / "tritonserver" / f"pytriton-{version}-py{_python_tag()}"
    backend = root / "backends" / "python"
    binary = root / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        with tempfile.TemporaryDirectory() as download:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{name}=={version}", "-d", download],
                check=True,
            )
            wheel = next(Path(download).glob("*.whl"))
            staging = root.with_name(root.name + f".tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            with zipfile.ZipFile(wheel) as archive:
                members = [
                    m for m in archive.namelist() if m.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))
                ]
                archive.extractall(staging, members)
            wheel_backend = staging / "pytriton" / "tritonserver" / "backends" / "python"
            stub = staging / "pytriton" / "tritonserver" / "python_backend_stubs" / _python_tag()
            target = staging / "backends" / "python"
            target.mkdir(parents=True)
            for source in [*wheel_backend.iterdir(), stub / "triton_python_backend_stub"]:
                shutil.copy2(source, target / source.name)
            for executable in (
                staging / "pytriton" / "tritonserver" / "bin" / "tritonserver",
                target / "triton_python_backend_stub",
            ):
                executable.chmod(0o755)
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
    return TritonInstall(binary=binary, backend_dir=backend.parent, library_path=(root / "nvidia_pytriton.libs",))


def free_ports(count: int) -> list[int]:
    """Loopback ports free right now, so that a run never collides with another server (tests use fixed ones)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def find_tritonserver() -> TritonInstall:
    """The NGC container's server if there is one, else the pytriton wheel's (fetched once)."""
    if (SYSTEM_ROOT / "bin" / "tritonserver").is_file():
        return TritonInstall(binary=SYSTEM_ROOT / "bin" / "tritonserver", backend_dir=SYSTEM_ROOT / "backends")
    return _fetch_pytriton()


@dataclass
class TritonServer:
    """A running ``tritonserver`` on loopback ports; a context manager that stops it on exit."""

    repository: Path
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backend_dir}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
        ]

    def environment(self, install: TritonInstall) -> dict[str, str]:
        """The Python-backend stub runs isolated from PYTHONPATH: it finds our packages through the
        interpreter first on PATH (this environment's) and needs that interpreter's libpython."""
        env = dict(os.environ)
        libraries = [*map(str, install.library_path), sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, env.get("LD_LIBRARY_PATH", "")])
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def start(self, timeout: float = 300.0) -> TritonServer:
        install = find_tritonserver()
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command(install), env=self.environment(install), stdout=output, stderr=subprocess.STDOUT
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                log = f" (log: {self.log_file})" if self.log_file else ""
                raise RuntimeError(f"tritonserver exited with status {self.process.returncode} while starting{log}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
