"""The web console: Inference API → Keys, as the product page describes it. Server-rendered pages
over the same services as the console API; a session is an access token held in an HttpOnly cookie."""
