"""A mitmdump script for the runtime-option test: `GET /__set__/<option>/<value>`
on the proxy runs mitmproxy's `set` command, as `:set option=value` in the
console does, and answers 200, or 400 with the command's error;
`GET /__get__/<option>` answers the option's current value."""

from mitmproxy import ctx, exceptions, http


class RuntimeSet:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        parts = flow.request.path.split("/")
        if len(parts) == 4 and parts[1] == "__set__":
            try:
                ctx.master.commands.call("set", parts[2], parts[3])
            except exceptions.CommandError as exc:
                flow.response = http.Response.make(400, str(exc))
            else:
                flow.response = http.Response.make(200, "ok")
        elif len(parts) == 3 and parts[1] == "__get__":
            flow.response = http.Response.make(200, str(getattr(ctx.options, parts[2])))


addons = [RuntimeSet()]
