"""The one client of a running QA app and of the Serve controller that runs it, over HTTP: what the app answers from
and holds (its `/v1/index`), its Serve config (the controller's REST API at `nightly.serve_address`), and moving it
to an index version as `serve deploy` would. The nightly, retention and the tests and benchmarks that drive an app
use it; nothing else in the library speaks HTTP to the app."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.primitives import INGRESS

log = logging.getLogger(__name__)

SERVE_API = "/api/serve/applications/"
PROBE = "which passage answers this question?"


def http_json(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def json_or_empty(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def error_body(exc: urllib.error.HTTPError, limit: int = 100_000) -> dict[str, Any]:
    """An HTTP error's JSON body (the app's errors are JSON), or {}."""
    return json_or_empty(exc.read()[:limit].decode(errors="replace"))


def with_index_version(deploy_config: dict[str, Any], app: str, version: str) -> dict[str, Any]:
    """The Serve deploy config with the app's version set where it is set, the ingress's `user_config`, and any
    `index_version` another deployment's user_config still carries (configs written for older releases) dropped,
    so that one setting moves the question encoder, every index shard and BM25 together (pure)."""
    applications = [dict(a) for a in deploy_config["applications"]]
    target = next((a for a in applications if a.get("name") == app), None)
    if target is None:
        raise PipelineError(
            f"Serve has no application named {app!r} deployed from a config "
            f"(found {[a.get('name') for a in applications]}): check nightly.serve_app"
        )
    deployments = []
    for deployment in target.get("deployments", []):
        deployment = dict(deployment)
        user_config = {k: v for k, v in (deployment.get("user_config") or {}).items() if k != "index_version"}
        if deployment.get("name") == INGRESS or user_config:
            deployment["user_config"] = user_config
        else:
            deployment.pop("user_config", None)
        deployments.append(deployment)
    ingress = next((d for d in deployments if d.get("name") == INGRESS), None)
    if ingress is None:
        ingress = {"name": INGRESS}
        deployments.append(ingress)
    ingress["user_config"] = {**(ingress.get("user_config") or {}), "index_version": version}
    target["deployments"] = deployments
    return {**deploy_config, "applications": applications}


def app_url(config: PipelineConfig) -> str:
    """Where the app answers HTTP: `nightly.serve_url`, else serve.host:serve.port."""
    host = "127.0.0.1" if config.serve.host == "0.0.0.0" else config.serve.host
    return (config.nightly.serve_url or f"http://{host}:{config.serve.port}").rstrip("/")


def auth_headers(config: PipelineConfig) -> dict[str, str]:
    """The app's Bearer key, from the variable `serve.api_key_env` names, when it has one."""
    key = os.environ.get(config.serve.api_key_env) if config.serve.api_key_env else None
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class AppClient:
    """The app `app` answering at `url` (with `headers`), run by the Serve controller at `serve_address` (the
    dashboard's address); either may be None where only the other is asked."""

    url: str | None = None
    serve_address: str | None = None
    app: str = "qa"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: PipelineConfig) -> AppClient:
        """The app the deployment YAML's `serve` and `nightly` sections describe."""
        address = config.nightly.serve_address.rstrip("/") if config.nightly.serve_address else None
        return cls(app_url(config), address, config.nightly.serve_app, auth_headers(config))

    # -- the Serve controller --------------------------------------------------------------------------------------
    def serve_details(self) -> dict[str, Any]:
        """The controller's view of every application (`GET /api/serve/applications/`)."""
        if not self.serve_address:
            raise PipelineError("no Serve address to ask (nightly.serve_address is unset)")
        return http_json("GET", f"{self.serve_address}{SERVE_API}")

    def deploy(self, deploy_config: dict[str, Any]) -> None:
        """What `serve deploy` sends: the whole declarative config (`PUT /api/serve/applications/`)."""
        if not self.serve_address:
            raise PipelineError("no Serve address to deploy to (nightly.serve_address is unset)")
        http_json("PUT", f"{self.serve_address}{SERVE_API}", deploy_config, timeout=60)

    def set_version(self, version: str) -> None:
        """Set the app's version (the ingress's `user_config.index_version`) and leave every other application and
        setting as deployed. Applications started with `serve.run` have no config to keep: refused."""
        details = self.serve_details()
        applications = details.get("applications", {})
        imperative = [name for name, app in applications.items() if not app.get("deployed_app_config")]
        if imperative:  # a declarative PUT would delete them
            raise PipelineError(
                f"Serve applications {imperative} were started with serve.run, not from a config: "
                f"deploy the QA app with `serve deploy` or a RayService so the nightly can update it"
            )
        current = {
            key: details[key]
            for key in ("proxy_location", "http_options", "grpc_options")
            if details.get(key) is not None
        }
        deployed = [app["deployed_app_config"] for app in applications.values()]
        self.deploy(with_index_version({**current, "applications": deployed}, self.app, version))

    def configured_version(self) -> str | None:
        """The version the app's Serve config sets (None: it follows `indexes/LATEST`, or there is no such app)."""
        app = self.serve_details().get("applications", {}).get(self.app)
        return _ingress_version((app or {}).get("deployed_app_config") or {})

    # -- the app ---------------------------------------------------------------------------------------------------
    def index(self, timeout: float = 30) -> dict[str, Any]:
        """The app's `/v1/index`: the version it answers from, the target it moves to, what each part holds."""
        return http_json("GET", f"{self._app_url()}/v1/index", headers=self.headers, timeout=timeout)

    def search(self, questions: list[str], k: int = 1, mode: str = "dense", timeout: float = 30) -> dict[str, Any]:
        body = {"questions": questions, "k": k, "mode": mode}
        return http_json("POST", f"{self._app_url()}/v1/search", body, self.headers, timeout)

    def _app_url(self) -> str:
        if not self.url:
            raise PipelineError("no URL of the app to ask (nightly.serve_url, or serve.host and serve.port)")
        return self.url

    def answering_version(self) -> str | None:
        """The version the app answers from now, or None when it does not answer."""
        try:
            return self.index().get("index_version")
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def held(self) -> set[str]:
        """The versions the app is set to, answers from and holds: its Serve config and its `/v1/index` (empty
        without a Serve address). An app that cannot be asked is an error: what it may hold is not to be guessed."""
        if not self.serve_address:
            return set()
        try:
            app = self.serve_details().get("applications", {}).get(self.app)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PipelineError(f"cannot ask Serve at nightly.serve_address ({exc}): nothing deleted") from None
        if app is None:
            return set()
        held = {_ingress_version(app.get("deployed_app_config") or {})}
        try:
            info = self.index()
        except urllib.error.HTTPError as exc:  # a 503 while a version moves in still says what each part holds
            info = error_body(exc)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise PipelineError(f"cannot ask the app at {self.url} what it holds ({exc}): nothing deleted") from None
        held |= {info.get("index_version"), info.get("target")}
        held |= {version for versions in (info.get("held") or {}).values() for version in versions}
        return {version for version in held if version}

    def move_to(self, version: str, timeout_s: float) -> dict[str, Any]:
        """Set the app's version through the Serve REST API, as `serve deploy` would: every part loads it beside
        the version it serves. Then check it by searching, in every mode the app has, until the answers come from
        it; a version the app refuses, or an app that fails its searches, is a PipelineError, and the app is set
        back to the version it answered from before."""
        before = self.answering_version()
        self.set_version(version)
        try:
            return self.wait_serving(version, timeout_s)
        except PipelineError as exc:
            if before is None or before == version:
                raise
            self.set_version(before)  # the one setting names what is answered, also for replicas started later
            raise PipelineError(f"{exc}; the app is set back to {before}") from None

    def wait_serving(self, version: str, timeout_s: float) -> dict[str, Any]:
        """Search the app in every mode it has until each answers 200 from `version` (`/v1/index` first, for the
        modes and a refusal); PipelineError naming what the app said when it refuses the version, or when
        `timeout_s` passes without it."""
        deadline, seen = time.monotonic() + timeout_s, "no answer yet"
        while time.monotonic() < deadline:
            try:
                info = self.index()
                if info.get("target") == version and info.get("last_error"):
                    raise PipelineError(f"the app at {self.url} refused index {version}: {info['last_error']}")
                modes = ["dense", "sparse", "hybrid"] if info.get("bm25") else ["dense"]
                answers = {mode: self.search([PROBE], 1, mode)["index_version"] for mode in modes}
                if set(answers.values()) == {version}:
                    log.info("%s serves %s in modes %s", self.url, version, modes)
                    return {"index_version": version, "url": self.url, "modes": modes}
                seen = f"answers from {answers}"
            except urllib.error.HTTPError as exc:
                body = exc.read()[:4000].decode(errors="replace")
                seen = f"HTTP {exc.code}: {body}"
                refused = json_or_empty(body)
                if refused.get("target") == version and refused.get("last_error"):
                    raise PipelineError(
                        f"the app at {self.url} refused index {version}: {refused['last_error']}"
                    ) from None
            except (urllib.error.URLError, OSError, ValueError) as exc:
                seen = f"unreachable ({exc})"
            time.sleep(0.5)
        raise PipelineError(
            f"index {version} was published, but {self.url} does not serve it after {timeout_s:.0f}s: {seen}"
        )


def _ingress_version(app_config: dict[str, Any]) -> str | None:
    for deployment in app_config.get("deployments", []):
        if deployment.get("name") == INGRESS:
            return (deployment.get("user_config") or {}).get("index_version")
    return None
