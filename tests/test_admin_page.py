"""``GET /admin``, the dashboard page, over HTTP: who gets which view, and its
headers (the browser tests are in test_admin_browser.py)."""

import re

import pytest

from tornado_app.handlers.pages import STATIC_DIR

from .helpers import get, logout


def assert_page_headers(response):
    assert response.headers["Content-Type"] == "text/html; charset=UTF-8"
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "style-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-store"


def view_of(response) -> str:
    return re.search(r'<body[^>]* data-view="([a-z]+)"', response.body.decode()).group(1)


@pytest.mark.gen_test
async def test_anonymous_gets_the_sign_in_form(base_url):
    response = await get(f"{base_url}/admin")
    assert response.code == 200
    assert_page_headers(response)
    html = response.body.decode()
    assert view_of(response) == "login"
    assert 'id="login-form"' in html
    assert "<canvas" not in html and "chart.umd" not in html


@pytest.mark.gen_test
@pytest.mark.parametrize("cookie", ["not-a-token", ""], ids=["bad", "empty"])
async def test_a_bad_cookie_gets_the_sign_in_form(base_url, cookie):
    response = await get(f"{base_url}/admin", Cookie=f"access_token={cookie}")
    assert response.code == 200
    assert view_of(response) == "login"


@pytest.mark.gen_test
async def test_a_non_admin_is_refused(base_url, make_user, token_for):
    await make_user("mallory")
    for headers in ({"Cookie": f"access_token={token_for('mallory')}"},
                    {"Authorization": f"Bearer {token_for('mallory')}"}):
        response = await get(f"{base_url}/admin", **headers)
        assert response.code == 403
        assert_page_headers(response)
        html = response.body.decode()
        assert view_of(response) == "forbidden"
        assert "Administrators only" in html and "mallory" in html
        # No dashboard at all: no charts, no chart library, no filters.
        assert "<canvas" not in html and "chart.umd" not in html and 'id="filters"' not in html
        api = await get(f"{base_url}/api/admin/analytics/summary", **headers)
        assert api.code == 403


@pytest.mark.gen_test
async def test_an_admin_gets_the_dashboard(base_url, make_user, token_for):
    await make_user("root", admin=True)
    response = await get(f"{base_url}/admin", Cookie=f"access_token={token_for('root')}")
    assert response.code == 200
    assert_page_headers(response)
    html = response.body.decode()
    assert view_of(response) == "dashboard"
    assert html.count("<canvas") == 9
    assert '<script src="/static/vendor/chartjs/chart.umd.min.js" defer></script>' in html
    assert 'id="signed-in-as">root<' in html
    # Nothing from elsewhere, nothing inline.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html and " style=" not in html


@pytest.mark.gen_test
async def test_disabled_and_logged_out_admins_get_the_sign_in_form(base_url, make_user,
                                                                   token_for, store):
    await make_user("root", admin=True)
    token = token_for("root")
    assert (await logout(base_url, token)).code == 200
    response = await get(f"{base_url}/admin", Cookie=f"access_token={token}")
    assert (response.code, view_of(response)) == (200, "login")
    await make_user("old", admin=True, disabled=True)
    response = await get(f"{base_url}/admin", Cookie=f"access_token={token_for('old')}")
    assert (response.code, view_of(response)) == (200, "login")


@pytest.mark.gen_test
async def test_the_user_name_is_escaped(base_url, make_user, token_for):
    await make_user("<b>x</b>")
    response = await get(f"{base_url}/admin", Cookie=f"access_token={token_for('<b>x</b>')}")
    assert response.code == 403
    html = response.body.decode()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


@pytest.mark.gen_test
async def test_the_dashboard_files_are_served_with_the_page_headers(base_url):
    for name in ("admin.js", "admin.css", "vendor/chartjs/chart.umd.min.js"):
        response = await get(f"{base_url}/static/{name}")
        assert response.code == 200, name
        assert "Content-Security-Policy" in response.headers


def test_chartjs_is_vendored_with_its_license_and_version():
    vendor = STATIC_DIR / "vendor" / "chartjs"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    version = (vendor / "VERSION").read_text()
    assert re.match(r"Chart\.js 4\.\d+\.\d+ ", version)
    assert version.split()[1] in (vendor / "chart.umd.min.js").read_text()[:200]


def test_dashboard_script_never_uses_inner_html_or_reads_the_token():
    script = (STATIC_DIR / "admin.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "access_token" not in script and "document.cookie" not in script
