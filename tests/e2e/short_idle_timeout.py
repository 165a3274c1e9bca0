"""A mitmdump script for the idle-timeout test on mitmproxy 11: mitmproxy's idle
connection limit (`TCP_TIMEOUT`, 600 s) cut to 1 s, so a held call outliving it
takes seconds to test instead of ten minutes. (mitmproxy 12 has the `tcp_timeout`
option instead.)"""

import mitmproxy.proxy.server

mitmproxy.proxy.server.TCP_TIMEOUT = 1
