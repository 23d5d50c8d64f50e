"""The coordinator's parts beside its routes and its store: settings, the live broadcaster, run
dispatch, authentication, the HTTP protocol guard and logging."""
