"""The platform layer: the `tandem` CLI (services/platform/cli) and the Ray actors and deployment
config that run the services together (services/platform/deploy). It is the only code that wires
services to one another; the services import shared/, and shared/ imports nothing above it."""
