"""The topics a recipient can choose in the preference centre."""

from __future__ import annotations

from dataclasses import dataclass

from suppression.models import Topic


@dataclass(frozen=True)
class PreferenceTopic:
    slug: str
    name: str
    description: str


def preference_topics() -> list[PreferenceTopic]:
    """Every public Topic (in the admin's order), then every purpose that marketing
    automations or broadcasts are tagged with and that has no Topic row: a marketer who
    tags an automation 'product-updates' has given recipients a topic to leave, whether
    or not a Topic row describes it yet. Such a purpose is named after its slug until one
    does; a Topic row that is not public keeps its purpose off the page."""
    from campaigns.models import Automation, Broadcast

    rows = list(Topic.objects.all())
    described = {topic.slug for topic in rows}
    topics = [PreferenceTopic(topic.slug, topic.name, topic.description) for topic in rows if topic.public]
    purposes = set(Automation.objects.filter(is_transactional=False).values_list("purpose", flat=True))
    purposes |= set(Broadcast.objects.values_list("purpose", flat=True))
    for slug in sorted(purpose for purpose in purposes if purpose and purpose not in described):
        topics.append(PreferenceTopic(slug, slug.replace("-", " ").replace("_", " ").capitalize(), ""))
    return topics
