"""One headless Chromium for every browser test in a process: the `browser` fixture is defined
here once. (Imported into each test module, a session fixture is a separate definition per
module, so two modules in one process opened two sync_playwright() contexts, and playwright's
sync API refuses to start inside the first one's running event loop.)"""

from browser import browser  # noqa: F401  (the session fixture, registered for tests/web/ here)
