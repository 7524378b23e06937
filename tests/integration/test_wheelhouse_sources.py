"""build_wheelhouse.py with the package sources real projects have: a private index that needs credentials
(served on loopback, basic auth) and a directory of local wheels. The credentials reach pip through stdin
and its environment, never a command line. (The app's own build backend, setuptools, still comes from pip's
default index, as for every wheelhouse the suite builds.)"""

import base64
import http.server
import json
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import localredis

BUILDER = Path(__file__).resolve().parents[2] / "roles" / "celery_worker" / "files" / "build_wheelhouse.py"
USER, PASSWORD = "ci", "s3cr%2Ft"  # "s3cr/t", percent-encoded as a URL needs it


def write_wheel(directory, distribution, version):
    """A minimal pure-Python wheel (enough for pip download to take it)."""
    module = distribution.replace("-", "_")
    path = Path(directory) / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def private_index(tmp_path):
    """A PEP 503 index on loopback that answers only with the right basic-auth credentials."""
    root = tmp_path / "index"
    (root / "simple" / "private-dep").mkdir(parents=True)
    write_wheel(root / "simple" / "private-dep", "private-dep", "1.0")
    expected = "Basic " + base64.b64encode(f"{USER}:s3cr/t".encode()).decode()
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            seen.append(self.headers.get("Authorization") == expected)
            if not seen[-1]:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="private"')
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", localredis.free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{USER}:{PASSWORD}@127.0.0.1:{server.server_address[1]}/simple/", seen
    server.shutdown()


def test_a_private_index_with_credentials_and_local_wheels_fill_the_wheelhouse(tmp_path, private_index):
    url, seen = private_index
    app = tmp_path / "app"
    (app / "src" / "tiny_app").mkdir(parents=True)
    (app / "src" / "tiny_app" / "__init__.py").write_text("")
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tiny-app"\nversion = "1.0"\ndependencies = ["private-dep", "local-dep"]\n'
        '[tool.setuptools.packages.find]\nwhere = ["src"]\n')
    (app / "requirements.lock").write_text("private-dep==1.0\nlocal-dep==1.0\n")
    local = tmp_path / "local wheels"  # a space in the path: it is an argument, never split
    local.mkdir()
    write_wheel(local, "local-dep", "1.0")
    output = tmp_path / "release.tar"
    command = [sys.executable, str(BUILDER), "--app-source", str(app), "--lock", str(app / "requirements.lock"),
               "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "--output", str(output),
               f"--find-links={local}", "--index-from-stdin"]
    build = subprocess.run(command, input=json.dumps({"index_url": "", "extra_index_urls": [url]}),
                           capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr
    assert "s3cr" not in " ".join(command) + build.stdout + build.stderr
    assert seen and seen[-1] is True  # pip asked the private index, with the credentials
    with tarfile.open(output) as archive:
        names = sorted(Path(name).name for name in archive.getnames())
    assert {"private_dep-1.0-py3-none-any.whl", "local_dep-1.0-py3-none-any.whl",
            "tiny_app-1.0-py3-none-any.whl", "requirements.lock", "SOURCE_DIGEST"} <= set(names), names
