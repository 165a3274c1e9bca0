"""A mitmdump script for the idle-timeout test: mitmproxy's idle connection
limit (`TCP_TIMEOUT`, 600 s) cut to 1 s, so a held call outliving it takes
seconds to test instead of ten minutes."""

import mitmproxy.proxy.server

mitmproxy.proxy.server.TCP_TIMEOUT = 1
