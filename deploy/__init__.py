"""How dhub-batches is deployed; `deploy.local` runs the whole stack on one machine."""
