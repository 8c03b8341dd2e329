"""Server-rendered pages for tenants (the portal). The domain never imports this package."""
