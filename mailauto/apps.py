from django.apps import AppConfig


class MailautoConfig(AppConfig):
    name = "mailauto"
    verbose_name = "mailauto"

    def ready(self) -> None:
        from mailauto import checks  # noqa: F401  (registers the system checks)
