"""Server plumbing shared by the three services: settings, validation and status codes, serving."""
