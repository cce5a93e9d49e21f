from django.apps import AppConfig


class WebhooksConfig(AppConfig):
    name = "webhooks"

    def ready(self) -> None:
        from anymail.signals import tracking

        from webhooks.receivers import tracking_received

        # dispatch_uid: connected once however often ready() runs.
        tracking.connect(tracking_received, dispatch_uid="webhooks.tracking_received")
