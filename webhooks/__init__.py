"""ESP tracking webhooks: Anymail's views under /webhooks/, the tracking signal receiver, and
the deduplicated TrackingEvent store."""
