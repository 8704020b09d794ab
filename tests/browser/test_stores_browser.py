"""The teacher-stores page in a real browser: a store's row (size, bytes/token, reuse, runs), a delete refused
while a queued run needs the store (after the confirmation), then allowed once it no longer does; and the page
on a 390 px phone screen, its table scrolling inside its card."""

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone
from playwright.sync_api import expect

from experiments.models import Membership, Run, TeacherStore
from experiments.services import lifecycle, teacher_stores
from tests.browser.session import log_in
from tests.factories import (
    DatasetSpecFactory,
    ExperimentFactory,
    MembershipFactory,
    ModelSpecFactory,
    RunFactory,
    TeamFactory,
    UserFactory,
)
from tests.teacher_store_entries import artifact_cache, topk_use

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "stores-pass-123"


@pytest.fixture
def store_setup():
    """A store filled by one run and reused by another, and a queued run of the same teacher and data."""
    user = UserFactory(username="store-user")
    user.set_password(PASSWORD)
    user.save()
    team = TeamFactory(name="Language")
    MembershipFactory(user=user, team=team, role=Membership.Role.LEAD)
    teacher = ModelSpecFactory(team=team, name="tiny-llama-teacher", config={"hidden_sizes": [64]})
    dataset = DatasetSpecFactory(team=team, name="fortunes-with-a-rather-long-dataset-name")
    experiment = ExperimentFactory(team=team, dataset=dataset, teacher=teacher, name="topk sweep")
    config = {"teacher": {"source": "builtin", "name": "mlp"}, "dataset": {"source": "builtin", "name": "x"},
              "terms": [{"name": "topk", "weight": 1.0, "params": {"k": 8}}], "train": {"max_steps": 20}}
    now = timezone.now()
    use = topk_use(artifact_cache(), positions=120, k=8)
    for hit in (False, True):
        run = RunFactory(experiment=experiment, team=team, teacher=teacher, config=config,
                         status=Run.Status.SUCCEEDED, started_at=now, finished_at=now)
        facts = teacher_stores.store_facts({"teacher_cache": [{**use, "hit": hit}]})
        teacher_stores.stores_record(run=run, facts=facts)
    queued = RunFactory(experiment=experiment, team=team, teacher=teacher, config=config)
    return TeacherStore.objects.get(), queued


def test_the_stores_page_and_a_refused_then_allowed_delete(page, live_server, store_setup, screenshot):
    store, queued = store_setup
    log_in(page, live_server, "store-user", PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Stores").click()
    expect(page).to_have_url(live_server.url + "/stores/")
    row = page.locator(f'tr[data-store-id="{store.pk}"]')
    expect(row).to_contain_text("tiny-llama-teacher")
    expect(row).to_contain_text("k = 8")
    expect(row).to_contain_text("max length 64")
    expect(row.locator("td.num").nth(2)).to_have_text(f"{store.bytes_per_token:.0f}")
    expect(row.locator("td.num").nth(3)).to_have_text("1")  # reused once
    expect(row.get_by_role("link", name=re.compile(r"^#\d+$"))).to_have_count(2)
    screenshot("stores-list")

    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    row.get_by_role("button", name="Delete").click()
    refused = f"needed by queued or running run #{queued.pk} (queued)"
    expect(page.locator(".messages")).to_contain_text(refused)
    assert dialogs and dialogs[0].startswith(f"Delete the store {store.label}")
    expect(page).to_have_url(live_server.url + f"/stores/{store.pk}/")
    assert TeacherStore.objects.filter(pk=store.pk).exists()
    screenshot("stores-delete-refused")

    lifecycle.run_cancel(run=queued)
    page.get_by_role("button", name="Delete store").click()
    expect(page).to_have_url(live_server.url + "/stores/")
    expect(page.locator(".messages")).to_contain_text("freed")
    expect(page.locator("p.empty")).to_contain_text("No teacher stores")
    assert not (Path(settings.ARTIFACT_ROOT) / store.path).exists()


def test_the_stores_page_fits_a_phone_and_its_table_scrolls_in_its_card(page, live_server, store_setup,
                                                                        screenshot):
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, live_server, "store-user", PASSWORD)
    page.goto(live_server.url + "/stores/")
    expect(page.locator("table.stores")).to_be_visible()
    widths = page.evaluate("""() => ({page: document.documentElement.scrollWidth, viewport: window.innerWidth,
        card: document.querySelector('.table-card').getBoundingClientRect().right,
        overflow: getComputedStyle(document.querySelector('.table-card')).overflowX})""")
    assert widths["page"] <= widths["viewport"] and widths["card"] <= widths["viewport"]
    assert widths["overflow"] == "auto"
    screenshot("stores-phone")
