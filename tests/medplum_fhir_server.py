"""An independent FHIR R4 server for the exactly-once sync tests: Medplum's FhirRouter (npm).

The stored resources, conditional create (`ifNoneExist` in `Bundle.entry.request`), urn:uuid
reference rewriting and search are Medplum's code (tests/npm/medplum_fhir_server.mjs runs
`@medplum/fhir-router` over its in-memory repository in a node process on loopback), so the
client is judged against someone else's reading of FHIR R4 http.html#ccreate, not ours.

In front of it sits the same HTTP front as our receiver (tests/fhir_server.FhirTestServer):
bearer token, gzip, fhir.resources validation and the injected faults ("500", "429", "drop",
"timeout", "commit-then-drop") stay there; only `apply_transaction` is forwarded to Medplum.
Transactions are forwarded one at a time: Medplum's own server serialises conditional creates
in its database; its in-memory repository does not (nor does it roll back a failed
transaction), and these tests are about our client's re-sends, not about atomicity.
Its search scans every stored resource, so a transaction takes seconds on a loaded machine:
the tests give it fewer visits.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import requests

from tests.conftest import missing, require_tool
from tests.fhir_server import FhirTestServer
from tests.peers import stop_process

NPM_DIR = Path(__file__).resolve().parent / "npm"
MEDPLUM_PACKAGE = "@medplum/fhir-router"
START_TIMEOUT_S = 120.0  # node indexes the R4 definitions at start: seconds on a loaded Pi-class box
# a merged transaction took ~50 s on a box at load 30 (its searches scan the store): the front must
# outwait it, or it drops the client's request while node still applies it
UPSTREAM_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0  # SIGTERM ends node at once (no handler); then SIGKILL: its memory holds nothing to keep


def medplum_available() -> Path:
    """The node script, once scripts/fetch-test-assets has installed tests/npm (else skip; fail in CI)."""
    if not (NPM_DIR / "node_modules" / MEDPLUM_PACKAGE / "package.json").is_file():
        missing(f"npm {MEDPLUM_PACKAGE} is not installed in {NPM_DIR} (scripts/fetch-test-assets installs it)")
    return NPM_DIR / "medplum_fhir_server.mjs"


class MedplumFhirServer(FhirTestServer):
    """FhirTestServer's interface (faults, stats, applied, resources) with Medplum as the store."""

    def __init__(self, **kwargs: Any) -> None:
        self._script = medplum_available()
        self._node = require_tool("node")
        super().__init__(**kwargs)
        self.upstream = ""  # Medplum's own address, behind the front
        self._process: subprocess.Popen[str] | None = None
        self._forward_lock = threading.Lock()
        self._http = requests.Session()

    def __enter__(self) -> MedplumFhirServer:
        self._process = subprocess.Popen(
            [self._node, str(self._script)],
            cwd=NPM_DIR,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "NODE_NO_WARNINGS": "1"},
        )
        assert self._process.stdout is not None
        ready = threading.Event()
        port: list[str] = []

        def read_port() -> None:
            assert self._process is not None and self._process.stdout is not None
            for line in self._process.stdout:
                if line.startswith("LISTENING "):
                    port.append(line.split()[1])
                    ready.set()

        threading.Thread(target=read_port, name="medplum-stdout", daemon=True).start()
        if not ready.wait(START_TIMEOUT_S):
            self._process.kill()
            raise RuntimeError(f"Medplum FHIR server did not start (exit {self._process.poll()})")
        self.upstream = f"http://127.0.0.1:{port[0]}/fhir"
        super().__enter__()
        return self

    def close(self) -> None:
        super().close()
        self._http.close()
        # node may still be answering a request the front forwarded (a daemon handler thread the
        # test no longer waits for): stopping must not wait for it, nor fail the test over it
        stop_process(self._process, STOP_TIMEOUT_S)  # its stdout reader ends at the pipe's end

    def node_exit_code(self) -> int | None:
        """How the node process ended; None while it runs (or before it was started)."""
        return self._process.poll() if self._process is not None else None

    def apply_transaction(self, bundle: dict) -> dict:
        """Medplum applies the transaction; a refusal answers 400 through the front (ValueError)."""
        with self._forward_lock:
            answer = self._http.post(self.upstream, json=bundle, timeout=UPSTREAM_TIMEOUT_S)
        result: dict = answer.json()
        if answer.status_code != 200 or result.get("type") != "transaction-response":
            raise ValueError(f"Medplum refused the transaction ({answer.status_code}): {answer.text[:300]}")
        statuses = [str(e.get("response", {}).get("status", "")) for e in result.get("entry", [])]
        with self._lock:
            self.stats.created += sum(s.startswith("201") for s in statuses)
            self.stats.deduplicated += sum(s.startswith("200") for s in statuses)
            self.stats.transactions += 1
        self.count_applied(bundle)
        return result

    def resources(self, kind: str) -> list[dict]:
        """Every stored `kind` resource, read back from Medplum by search."""
        answer = self._http.get(f"{self.upstream}/{kind}", params={"_count": "1000"}, timeout=60)
        answer.raise_for_status()
        return [e["resource"] for e in answer.json().get("entry", [])]
