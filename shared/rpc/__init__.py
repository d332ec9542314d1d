"""gRPC plumbing shared by every service: the server bootstrap (health, reflection, graceful
shutdown), client channels with deadlines, and the proto <-> dataclass conversions of common types."""
