"""The registry browser under /ui/: sign-in, sessions, and pages drawn from the registry API.

`session` (the signed cookie and CSRF tokens), `signed_in` (who a session stands for now),
`registry` (API requests made in the user's name, authorized as the API authorizes them),
`manifests` (what the pages read of manifests and image configs),
`forms` (reading what the browser sends), `templates` (rendering, static files, browser rules)
and `pages` (the routes).
"""
