"""The notifier service: follower graph, room-started fan-out to Kafka, and the Inbox stream."""
