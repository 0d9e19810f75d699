# node_modules (from install_browser.sh) and the stub frontend hold no tests.
collect_ignore = ["node_modules", "stub"]
