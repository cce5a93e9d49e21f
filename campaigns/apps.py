from django.apps import AppConfig


class CampaignsConfig(AppConfig):
    name = "campaigns"
    verbose_name = "Campaigns"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from campaigns import checks  # noqa: F401  (registers the system checks)
        from campaigns.events import forget_event_type
        from campaigns.models import EventType

        # Cache invalidation only (no business flow): emit() keeps event types briefly.
        def forget(sender: type, instance: EventType, **kwargs: object) -> None:
            forget_event_type(instance.name)

        post_save.connect(
            forget, sender=EventType, dispatch_uid="campaigns.forget_event_type.save", weak=False
        )
        post_delete.connect(
            forget, sender=EventType, dispatch_uid="campaigns.forget_event_type.delete", weak=False
        )
