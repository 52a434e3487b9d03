"""Stage: deployment — bundles, `d2v-export run`, long-audio chunking, server layouts and serving."""
