"""The mitmproxy edge: thin addons that map mitmproxy hooks onto the plain modules."""
