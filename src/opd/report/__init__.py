"""Writing results for people: markdown, HTML and figures."""
