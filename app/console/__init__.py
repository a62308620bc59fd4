"""The web console: server-rendered pages (Jinja2 + a little plain JavaScript) over the same services the
``/v1`` API routes call, scoped to the tenant of the API key that logged in. See ``app.console.routes``."""
