"""The web surface as a LAN attacker sees it: hosts, origins, logins, sessions, uploads, TLS.

The end-to-end tests run the real app (`python app.py --demo`) on loopback and act as a second origin
and as other hosts by sending their headers (Origin, Host, Sec-Fetch-Site). The LAN app trusts
X-Forwarded-For from 127.0.0.1 (CLAIR_TRUSTED_PROXIES, as behind a local reverse proxy), so a request
carrying `X-Forwarded-For: 192.168.77.x` is a request from that LAN address as far as Clair can tell;
without that setting nobody's X-Forwarded-For is believed (test_forwarded_for_is_ignored_by_default).
The unit tests drive the back-off, the session store, the host list and the log filter with their own
clocks.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from clair.edge import web
from clair.edge.users import Users
from clair.edge.web import Hosts, LoginLimiter, RepeatFilter, Sessions, client_key, lan_urls
from tests.support import ROOT, App, wait_until

PASSWORD = "a long household password"
FOREIGN = "http://evil.example"
GRANT_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials")


# --- unit: back-off, sessions, hosts, log filter ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_backoff_grows_per_address_and_resets_on_success() -> None:
    clock = Clock()
    lim = LoginLimiter(clock=clock)
    delays = [lim.failure("192.168.1.9") for _ in range(6)]
    assert delays == [0, 0, 0, 2, 4, 8]
    assert lim.retry_after("192.168.1.9") == 8
    assert lim.retry_after("192.168.1.10") == 0  # another address is not punished
    clock.now += 8.5
    assert lim.retry_after("192.168.1.9") == 0
    assert lim.failure("192.168.1.9") == 16
    for _ in range(20):
        lim.failure("192.168.1.9")
    assert lim.retry_after("192.168.1.9") == LoginLimiter.MAX_DELAY
    lim.success("192.168.1.9")
    assert lim.retry_after("192.168.1.9") == 0


def test_ipv6_addresses_of_one_host_share_a_backoff() -> None:
    lim = LoginLimiter(clock=Clock())
    for i in range(5):
        lim.failure(f"2001:db8:1:2::{i + 1}")  # one /64: a host can pick any of these
    assert lim.retry_after("2001:db8:1:2::ffff") > 0
    assert lim.retry_after("2001:db8:1:3::1") == 0
    assert client_key("::ffff:192.168.1.9") == "192.168.1.9"


def test_one_login_check_at_a_time_per_address() -> None:
    lim = LoginLimiter(clock=Clock())
    assert lim.begin("10.0.0.5")
    assert not lim.begin("10.0.0.5") and lim.retry_after("10.0.0.5") > 0
    assert lim.begin("10.0.0.6")
    lim.end("10.0.0.5")
    assert lim.begin("10.0.0.5")


def test_sessions_expire_and_end_with_their_user() -> None:
    clock = Clock()
    alive = {"alice": "h1", "bob": "h2"}  # name -> what changes with the password
    s = Sessions(3600, user_stamp=alive.get, clock=clock)
    s["t1"] = "alice"
    clock.now += 1800
    s["t2"] = "bob"
    assert s.get("t1") == "alice" and "t1" in s and s["t2"] == "bob"
    assert s.get(None) is None and s.get("nope") is None
    clock.now += 1801  # t1 is now 3601 s old
    assert s.get("t1") is None and "t1" not in s
    with pytest.raises(KeyError):
        s["t1"]
    assert s.get("t2") == "bob"
    alive.pop("bob")  # deluser ends the sessions at once
    assert s.get("t2") is None
    assert dict(s) == {} and s.issued == {}
    s["t3"] = "alice"
    assert s.get("t3") == "alice"
    alive["alice"] = "h1-new"  # adduser alice again: a new password ends the sessions opened before it
    assert s.get("t3") is None
    s["t4"] = "alice"  # a login with the new password works
    assert s.get("t4") == "alice"


def test_a_new_password_ends_the_old_sessions_and_a_deleted_users_key_stops(tmp_path) -> None:
    """Through the real users and keys files, as `adduser` and `deluser` change them."""
    from clair.base.config import Config
    from clair.edge.users import Users
    from clair.edge.web import Web

    users = Users(tmp_path / "users.json")
    users.set_password("carol", "carolpass99")
    cfg = Config(users_file=str(tmp_path / "users.json"))
    web = Web(cfg, users)
    web.sessions["tok"] = "carol"
    assert web.sessions.get("tok") == "carol"
    users.set_password("carol", "carolpass11")
    assert web.sessions.get("tok") is None
    key, _ = web.keys.add("carol")
    from starlette.datastructures import Headers

    assert web.api_key_check(Headers({"authorization": f"Bearer {key}"}), "10.0.0.9").user == "carol"
    users.set_password("dave", "davepass000")  # someone stays, so keys are still needed
    users.delete("carol")
    assert web.api_key_check(Headers({"authorization": f"Bearer {key}"}), "10.0.0.9").user is None


def test_hosts_allowlist() -> None:
    local = Hosts("127.0.0.1")
    for ok in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "localhost", "app.localhost:1"):
        assert local.allowed(ok), ok
    for bad in ("evil.example", "evil.example:7860", "", None, "127.0.0.1.evil.example", "[bad", socket.gethostname()):
        assert not local.allowed(bad), bad
    lan = Hosts("0.0.0.0", extra="clair.example.org, Proxy.Lan")
    assert lan.allowed(f"{socket.gethostname()}:7860")
    assert lan.allowed("clair.example.org") and lan.allowed("proxy.lan:443")
    assert not lan.allowed("evil.example")
    for _name, addr in web.interface_addresses():
        assert lan.allowed(f"[{addr}]:7860" if ":" in addr else f"{addr}:7860"), addr


def test_lan_urls_list_interface_addresses_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = [("eth0", "192.168.1.20"), ("wlan0", "10.0.0.7"), ("eth0", "fe80::1"), ("eth0", "2001:db8::5")]
    monkeypatch.setattr(web, "interface_addresses", lambda: fake)
    assert lan_urls("0.0.0.0", 7860) == ["http://192.168.1.20:7860", "http://10.0.0.7:7860"]
    assert lan_urls("::", 443, "https") == [
        "https://192.168.1.20:443",
        "https://10.0.0.7:443",
        "https://[2001:db8::5]:443",
    ]
    assert lan_urls("192.168.1.20", 7860) == ["http://192.168.1.20:7860"]
    assert lan_urls("127.0.0.1", 7860) == []


def test_interface_addresses_are_never_loopback_or_unspecified() -> None:
    for _name, addr in web.interface_addresses():
        ip = ipaddress.ip_address(addr)
        assert not ip.is_loopback and not ip.is_unspecified


def test_repeat_filter_keeps_a_flood_out_of_the_log() -> None:
    clock = Clock()
    f = RepeatFilter(burst=5, window=10.0, clock=clock)

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, msg, None, None)

    passed = sum(f.filter(rec("socket.accept() out of system resource")) for _ in range(10_000))
    assert passed == 5
    assert f.filter(rec("something else"))
    clock.now += 11
    r = rec("socket.accept() out of system resource")
    assert f.filter(r)
    assert "9995 more like this were dropped" in r.getMessage()
    logins = [rec("login failed user=%r addr=%s") for _ in range(50)]
    for r in logins:
        r.clair_always = True  # as clair.edge.web logs each login: every one is kept
    assert all(f.filter(r) for r in logins)


# --- end to end ---------------------------------------------------------------------------------


def _add_user(users_file: Path, name: str, password: str = PASSWORD) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "adduser", name, "--users-file", str(users_file)],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def _login(base: str, name: str = "alice", password: str = PASSWORD, **kw) -> httpx.Client:
    c = httpx.Client(base_url=base, timeout=30, **kw)
    r = c.post("/login", data={"username": name, "password": password})
    assert r.status_code == 200, r.text
    return c


@pytest.fixture(scope="module")
def lan_app(tmp_path_factory):
    """Clair serving every interface (--listen) with one user: the supported LAN set-up."""
    tmp = tmp_path_factory.mktemp("lan")
    users_file = tmp / "users.json"
    _add_user(users_file, "alice")
    _add_user(users_file, "bob")
    env = {"CLAIR_USERS_FILE": str(users_file), "CLAIR_PRELOAD": "0", "CLAIR_TRUSTED_PROXIES": "127.0.0.1"}
    app = App(tmp, env, args=["--demo", "--listen"], auth=("alice", PASSWORD))
    yield app
    app.stop()


@pytest.mark.slow
def test_lan_without_users_refuses_to_start_and_says_how(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CLAIR_")}
    env |= {"CLAIR_OUTPUT_DIR": str(tmp_path / "outputs"), "CLAIR_DEMO": "1"}
    for args in (["--listen"], ["--host", "0.0.0.0"]):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "python app.py adduser NAME" in proc.stderr and "--insecure" in proc.stderr
        assert str(tmp_path / "users.json") in proc.stderr
        assert "Traceback" not in proc.stderr and "running at" not in proc.stdout


@pytest.mark.slow
def test_lan_start_prints_the_lan_addresses(lan_app: App) -> None:
    out = lan_app.log.read_text()
    assert "users: alice, bob" in out
    printed = re.findall(r"on the LAN: (\S+)", out)
    expected = [f"http://{a}:{lan_app.port}" for _n, a in web.interface_addresses() if ":" not in a]
    assert printed == expected
    assert not any("0.0.0.0" in u or "127.0.0.1" in u for u in printed)
    assert "PASSWORD" not in out and PASSWORD not in out


@pytest.mark.slow
def test_logged_out_visitor_sees_only_the_login(lan_app: App) -> None:
    c = httpx.Client(base_url=lan_app.url, timeout=30)
    page = c.get("/")
    assert page.status_code == 200 and '"auth_required":true' in page.text.replace(" ", "")
    assert "/render" not in page.text and "Chat" not in page.text
    # Clair's login page: its name, and how to get an account (Gradio's stock page says only "Login").
    assert "<title>Clair</title>" in page.text and "No account yet? Ask whoever runs Clair" in page.text
    for path in (
        "/config",
        "/gradio_api/info",
        "/gradio_api/startup-events",
        "/gradio_api/heartbeat/abc",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=" + str(lan_app.log),
        "/gradio_api/queue/data?session_hash=abc",
        "/gradio_api/call/status",
        "/docs",
        "/redoc",
        "/openapi.json",
        "/status",
    ):
        r = c.get(path)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert "root:" not in r.text and "components" not in r.text
    r = c.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
    assert r.status_code == 401
    assert c.get("/healthz").status_code == 200
    assert c.get("/theme.css").status_code == 200  # the login page is drawn with it


@pytest.mark.slow
def test_docs_pages_are_gone_even_logged_in(lan_app: App) -> None:
    c = _login(lan_app.url)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert c.get(path).status_code == 404, path


@pytest.mark.slow
def test_login_form_then_the_app(lan_app: App) -> None:
    c = httpx.Client(base_url=lan_app.url, timeout=30)
    bad = c.post("/login", data={"username": "alice", "password": "nope"})
    assert bad.status_code == 400 and not c.cookies
    c = _login(lan_app.url)
    config = c.get("/config")
    assert config.status_code == 200
    props = [comp.get("props", {}) for comp in config.json()["components"]]
    lan = next(p for p in props if p.get("elem_id") == "lan-link")["value"]
    for _name, addr in web.interface_addresses():
        if ":" not in addr:  # --listen is 0.0.0.0: IPv4 only
            assert f"http://{addr}:{lan_app.port}" in lan
    assert "127.0.0.1" not in lan and "0.0.0.0" not in lan
    urls = lan_urls("0.0.0.0", lan_app.port)
    if urls:  # a QR code of the first link, for phones
        qr = next(p for p in props if p.get("elem_id") == "lan-qr")["value"]
        assert qr.startswith('<img src="data:image/svg+xml;base64,') and f"QR code: {urls[0]}" in qr
    logout = next(p for p in props if p.get("value") == "Log out")
    assert logout.get("visible") is not False
    assert "/status" in str(c.get("/gradio_api/info").json()["named_endpoints"])


@pytest.mark.slow
def test_gradio_client_needs_the_same_users(lan_app: App) -> None:
    assert lan_app.status()["demo"] is True  # the fixture's client logged in with auth=
    with pytest.raises(AuthenticationError):
        Client(lan_app.url, download_files=False, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(lan_app.url, auth=("alice", "wrong password"), download_files=False, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(lan_app.url, auth=("nobody", PASSWORD), download_files=False, verbose=False)
    bob = Client(lan_app.url, auth=("bob", PASSWORD), download_files=False, verbose=False)
    assert bob.predict(api_name="/status")["demo"] is True


@pytest.mark.slow
def test_a_renders_copy_in_gradios_cache_is_its_owners_only(lan_app: App) -> None:
    """Gradio copies every image a handler returns into its cache and serves the copy at /gradio_api/file=
    to anyone with the link; the owner check holds there as in the output folder."""
    result, info = lan_app.render()  # as alice (the fixture's client)
    cached = result["path"] if isinstance(result, dict) else result
    assert Path(cached).parent != Path(info["path"]).parent, "expected Gradio's cache copy, not the output file"
    alice, bob = _login(lan_app.url), _login(lan_app.url, "bob")
    nobody = httpx.Client(base_url=lan_app.url, timeout=30)
    for url in ("/gradio_api/file=" + cached, "/gradio_api/file/" + cached, "/gradio_api/file=" + cached.replace("/", "//")):
        if "//" not in url:
            assert alice.get(url).content.startswith(b"\x89PNG"), url
        for who, client in (("bob", bob), ("nobody", nobody)):
            for r in (client.get(url), client.head(url), client.get(url, headers={"Range": "bytes=0-99"})):
                assert r.status_code in (401, 403, 404), (who, url, r.status_code)
                assert b"PNG" not in r.content
    # The output file itself, named directly, stays alice's too.
    assert bob.get("/gradio_api/file=" + info["path"]).status_code == 404


@pytest.mark.slow
def test_foreign_origin_gets_no_cors_grant(lan_app: App) -> None:
    """Gradio's own middleware grants any Origin with credentials when the Host is not localhost."""
    c = _login(lan_app.url, headers={"Host": f"{socket.gethostname()}:{lan_app.port}"})
    evil = {"Origin": FOREIGN}
    responses = {
        "/config": c.get("/config", headers=evil),
        "/gradio_api/info": c.get("/gradio_api/info", headers=evil),
        "/healthz": c.get("/healthz", headers=evil),
        "POST queue/join": c.post("/gradio_api/queue/join", json={}, headers=evil),
    }
    for path in ("/gradio_api/queue/join", "/config", "/login", "/gradio_api/info"):
        responses["OPTIONS " + path] = c.options(
            path,
            headers={**evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
        )
    assert responses["/config"].status_code == 200  # the read itself works, the browser just may not show it
    for what, r in responses.items():
        for h in GRANT_HEADERS:
            assert h not in r.headers, (what, r.status_code, dict(r.headers))


@pytest.mark.slow
def test_foreign_state_changing_requests_are_refused(lan_app: App) -> None:
    c = _login(lan_app.url)
    payload = {"data": [], "fn_index": 0, "session_hash": "abcdef"}
    for headers in (
        {"Origin": FOREIGN},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{lan_app.port + 1}"},  # another port is another origin
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ):
        r = c.post("/gradio_api/queue/join", json=payload, headers=headers)
        assert r.status_code == 403, (headers, r.status_code, r.text)
        r = c.post("/logout", headers=headers)
        assert r.status_code == 403, headers
    # Login CSRF (logging a victim into the attacker's account) is refused too.
    r = httpx.post(lan_app.url + "/login", data={"username": "bob", "password": PASSWORD}, headers={"Origin": FOREIGN})
    assert r.status_code == 403
    assert c.get("/config").status_code == 200  # still logged in: the refused logout did nothing
    own = c.post(
        "/gradio_api/queue/join",
        json=payload,
        headers={"Origin": lan_app.url, "Sec-Fetch-Site": "same-origin"},
    )
    assert own.status_code != 403


@pytest.mark.slow
def test_foreign_host_is_refused(lan_app: App) -> None:
    c = _login(lan_app.url)
    for path in ("/", "/config", "/healthz", "/gradio_api/info"):
        for host in ("evil.example", f"evil.example:{lan_app.port}", "127.0.0.1.nip.io"):
            r = c.get(path, headers={"Host": host})
            assert r.status_code == 421, (path, host, r.status_code)
            assert "components" not in r.text
    r = httpx.post(lan_app.url + "/login", data={"username": "alice", "password": PASSWORD}, headers={"Host": "evil.example"})
    assert r.status_code == 421
    assert c.get("/config", headers={"Host": f"{socket.gethostname()}:{lan_app.port}"}).status_code == 200


@pytest.mark.slow
def test_security_headers(lan_app: App) -> None:
    c = httpx.Client(base_url=lan_app.url, timeout=30)
    for r in (c.get("/"), c.get("/config"), c.get("/healthz"), c.get("/", headers={"Host": "evil.example"})):
        assert "frame-ancestors 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-frame-options"] == "SAMEORIGIN"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "same-origin"
        assert "server" not in r.headers


@pytest.mark.slow
def test_healthz_details_need_a_login_or_loopback(lan_app: App) -> None:
    lan = {"X-Forwarded-For": "192.168.77.10"}
    assert httpx.get(lan_app.url + "/healthz", headers=lan).json() == {"ok": True}
    assert "holder" in httpx.get(lan_app.url + "/healthz").json()  # loopback
    c = _login(lan_app.url, headers=lan)
    assert "holder" in c.get("/healthz").json()


@pytest.mark.slow
def test_login_failures_are_slowed_and_logged(lan_app: App) -> None:
    attacker = {"X-Forwarded-For": "192.168.77.66"}
    c = httpx.Client(base_url=lan_app.url, timeout=30, headers=attacker)
    wrong = "guess-%d-never-logged"
    codes = [c.post("/login", data={"username": "alice", "password": wrong % i}).status_code for i in range(4)]
    assert codes == [400, 400, 400, 400]
    r = c.post("/login", data={"username": "alice", "password": PASSWORD})
    assert r.status_code == 429  # even the right password waits: nothing is checked during the back-off
    wait = int(r.headers["retry-after"])
    assert 1 <= wait <= 2
    # Another address is not held back.
    _login(lan_app.url, headers={"X-Forwarded-For": "192.168.77.67"})
    time.sleep(wait + 0.2)
    assert c.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 200
    log = wait_until(lambda: (t := lan_app.log.read_text()).count("addr=192.168.77.66") >= 5 and t, timeout=10)
    failures = [line for line in log.splitlines() if "login failed" in line and "addr=192.168.77.66" in line]
    assert len(failures) == 4 and all("user='alice'" in line for line in failures)
    assert "login user='alice' addr=192.168.77.66" in log
    assert "never-logged" not in log and PASSWORD not in log


@pytest.mark.slow
def test_logout_is_a_post_that_ends_only_this_session(lan_app: App) -> None:
    a, b = _login(lan_app.url), _login(lan_app.url)  # alice in two browsers
    assert a.get("/logout").status_code == 405
    assert a.get("/config").status_code == 200  # a GET logs nobody out
    r = a.post("/logout")
    assert r.status_code == 303
    assert a.get("/config").status_code == 401  # the cookies were cleared
    token = next(v for k, v in b.cookies.items() if k.startswith("access-token-unsecure-"))
    name = next(k for k in b.cookies if k.startswith("access-token-unsecure-"))
    assert b.get("/config").status_code == 200  # the other session lives on
    stale = httpx.Client(base_url=lan_app.url, cookies={name: token})
    assert stale.get("/config").status_code == 200
    b.post("/logout")
    assert stale.get("/config").status_code == 401  # the token itself is gone, not just the cookie


@pytest.mark.slow
def test_uploads_are_refused(lan_app: App) -> None:
    c = _login(lan_app.url)
    r = c.post("/gradio_api/upload", files={"files": ("big.bin", b"x" * 200_000)})
    assert r.status_code == 403 and "no uploads" in r.text
    r = c.post("/gradio_api/queue/join", content=b"{" + b" " * (9 * 1024 * 1024) + b"}")
    assert r.status_code == 413


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.mark.slow
def test_insecure_lan_over_tls_then_first_user_then_session_expiry(tmp_path: Path) -> None:
    """--insecure starts with no users; adding one switches the login on at once; sessions expire; TLS works."""
    cert, key = _self_signed(tmp_path)
    users_file = tmp_path / "users.json"
    env = {
        "CLAIR_USERS_FILE": str(users_file),
        "CLAIR_PRELOAD": "0",
        "CLAIR_TLS_CERT": str(cert),
        "CLAIR_TLS_KEY": str(key),
        "CLAIR_SESSION_HOURS": str(4 / 3600),  # four seconds
    }
    app = App(tmp_path, env, args=["--demo", "--listen", "--insecure"], tls=True)
    try:
        assert app.url.startswith("https://")
        assert app.status()["demo"] is True  # no users, --insecure: no login
        out = app.log.read_text()
        assert "no users (--insecure)" in out and "on the LAN: https://" in out
        with pytest.raises(httpx.ConnectError):
            httpx.get(app.url + "/healthz")  # the certificate is checked: it is self-signed
        assert httpx.get(app.url + "/config", verify=False).status_code == 200

        _add_user(users_file, "alice")
        assert httpx.get(app.url + "/config", verify=False).status_code == 401  # no restart needed
        c = _login(app.url, verify=False)
        assert any(k.startswith("access-token-") for k in c.cookies)
        login = httpx.post(app.url + "/login", data={"username": "alice", "password": PASSWORD}, verify=False)
        set_cookies = login.headers.get_list("set-cookie")
        assert len(set_cookies) >= 2 and all("secure" in v.lower().split("; ") for v in set_cookies), set_cookies
        assert c.get("/config").status_code == 200
        wait_until(lambda: c.get("/config").status_code == 401, timeout=15, interval=0.5)
        assert Users(users_file).names() == ["alice"]
    finally:
        app.stop()


@pytest.mark.slow
def test_a_heartbeat_flood_locks_nobody_out_and_stays_out_of_the_log(lan_app: App) -> None:
    """Open heartbeat streams needed no login, and 250 of them locked a real user out."""
    import asyncio

    per_address = max(8, 256 // 4)  # a quarter of CLAIR_MAX_CONNECTIONS (default 256)
    flood = {"X-Forwarded-For": "192.168.77.90"}
    cookies = _login(lan_app.url, headers=flood).cookies
    lines_before = len(lan_app.log.read_text().splitlines())

    async def attack() -> tuple[list[int], list[int], int]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(base_url=lan_app.url, headers=flood, timeout=30, limits=limits) as anon:
            anonymous = await asyncio.gather(*(anon.get(f"/gradio_api/heartbeat/x{i}") for i in range(150)))
        async with httpx.AsyncClient(
            base_url=lan_app.url, headers=flood, cookies=cookies, timeout=30, limits=limits
        ) as ac:
            streams = await asyncio.gather(
                *(ac.send(ac.build_request("GET", f"/gradio_api/heartbeat/s{i}"), stream=True) for i in range(per_address))
            )
            try:
                extra = await ac.get("/gradio_api/heartbeat/one-too-many")
                # Meanwhile a member of the household on another machine gets in and is served.
                other = await asyncio.to_thread(_login, lan_app.url, "bob", PASSWORD, headers={"X-Forwarded-For": "192.168.77.91"})
                config = await asyncio.to_thread(other.get, "/config")
            finally:
                await asyncio.gather(*(s.aclose() for s in streams))
            return [r.status_code for r in anonymous], [s.status_code for s in streams] + [extra.status_code], config.status_code

    anonymous, held, other_user = asyncio.run(attack())
    assert set(anonymous) == {401}
    assert set(held[:-1]) == {200} and held[-1] == 429
    assert other_user == 200
    time.sleep(0.5)
    assert len(lan_app.log.read_text().splitlines()) - lines_before < 20


@pytest.mark.slow
def test_forwarded_for_is_ignored_by_default(tmp_path: Path) -> None:
    """From loopback, a rotating X-Forwarded-For dodged the login back-off (uvicorn trusted it from 127.0.0.1);
    without CLAIR_TRUSTED_PROXIES every try counts against the address it really comes from."""
    users_file = tmp_path / "users.json"
    _add_user(users_file, "alice")
    app = App(tmp_path, {"CLAIR_USERS_FILE": str(users_file), "CLAIR_PRELOAD": "0"}, args=["--demo"], auth=("alice", PASSWORD))
    try:
        c = httpx.Client(base_url=app.url, timeout=30)
        codes = [
            c.post("/login", data={"username": "alice", "password": f"guess-{i}"}, headers={"X-Forwarded-For": f"10.1.2.{i}"}).status_code
            for i in range(5)
        ]
        assert codes[:4] == [400, 400, 400, 400] and codes[4] == 429, codes
        assert "addr=10.1.2." not in app.log.read_text()
    finally:
        app.stop()
