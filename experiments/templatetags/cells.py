"""Table cells built in Python: the latency and speedup cells every table shows, and a leaderboard row. A
leaderboard page shows 50 rows of 14 cells; written as template markup each row cost ~60 variable lookups,
most of the page's rendering time. Every value is escaped (``format_html``, ``conditional_escape``)."""

from __future__ import annotations

from typing import Any

from django import template
from django.template.defaultfilters import floatformat
from django.utils.html import conditional_escape, format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from experiments.domain.compare import Latency, Speedup
from experiments.templatetags.distill import compact, path_for, pct, pp, pp_unsigned, sig3

register = template.Library()

_MISSING = mark_safe('<span class="muted">—</span>')
_NO_SPEEDUP = mark_safe('<span class="muted" title="A speedup is shown only with its interval: both '
                        'latencies must have been measured with their spread">—</span>')
_SPEEDUP_TITLE = ("Teacher latency / student latency at batch 1: the ratio of the medians; in brackets the "
                  "interval from the two measurements' fastest and slowest repeats")
_SETTINGS_DIFFER = mark_safe(' <span class="tag small" title="Teacher and student were measured on different '
                             'devices, thread counts or batches">settings differ</span>')
_LORA = (' <span class="tag tag-lora" data-adapter title="Trained through LoRA adapters of rank {}; the '
         'final model holds them merged into the weights">{}</span>')
_SWEEP = ' <span class="tag tag-sweep mono" title="This row\'s point of the experiment\'s sweep">{}</span>'
_RUN = '<div><a href="{}">#{}</a> <a class="muted" href="{}" title="The run\'s exact frozen config (JSON)">' \
       'config</a></div>'
_STORE = ('<div class="muted" data-store title="The stored teacher outputs these runs trained from">store: {}'
          '</div>')
_ROW = ('<tr class="{}"><td><input type="checkbox" form="compare-rows" name="runs" value="{}" '
        'aria-label="Compare {}"></td><td class="num rank">{}</td><td>{}</td><td>{}</td><td>{}</td>'
        '<td class="num nowrap">{}</td><td class="num">{}</td><td class="num nowrap">{}</td>'
        '<td class="num">{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td>'
        '<td class="nowrap">{}</td><td class="small nowrap">{}</td></tr>')


def _join(*parts: Any) -> SafeString:
    """The parts escaped (unless already safe) and joined; empty parts ("" or None) left out."""
    return mark_safe("".join(conditional_escape(p) for p in parts if p))


@register.simple_tag
def latency_cell(lat: Latency | None) -> SafeString:
    """A batch-1 latency: its median, p25–p75 in brackets and its setting as a tooltip, marked when it was
    measured on a (shared) CPU."""
    if not lat:
        return _MISSING
    if lat.setting:
        spread_note = ", p25–p75 in brackets" if lat.has_spread else ""
        title = f"Median of repeated forwards after warm-up{spread_note}; {lat.setting}"
    else:
        title = "A single median recorded before the spread and the setting were: compare with care"
    spread = format_html(' <span class="muted small" data-latency-spread>[{}–{}]</span>', sig3(lat.low),
                         sig3(lat.high)) if lat.has_spread else None
    mark = format_html(' <span class="tag tag-cpu small" data-cpu-mark title="{}: other processes share the '
                       'cores; compare only with the spread">{}</span>', lat.setting, lat.mark) \
        if lat.mark else None
    median = format_html('<span class="latency nowrap" title="{}">{} ms{}</span>', title, sig3(lat.median),
                         _join(spread))
    return _join(median, mark)


@register.simple_tag
def speedup_cell(speedup: Speedup | None) -> SafeString:
    """Teacher latency / student latency with its interval; "—" unless both latencies carry a spread."""
    if not speedup:
        return _NO_SPEEDUP
    title = _SPEEDUP_TITLE if speedup.comparable else \
        f"{_SPEEDUP_TITLE}. The two were measured in different settings (device, threads or batch)"
    return _join(
        format_html('<span class="speedup nowrap" data-speedup title="{}">{}× <span class="muted small" '
                    'data-speedup-interval>[{}–{}×]</span></span>', title, sig3(speedup.value),
                    sig3(speedup.low), sig3(speedup.high)),
        format_html(' <span class="tag tag-cpu small" data-cpu-mark>{}</span>', speedup.mark) if speedup.mark
        else None,
        None if speedup.comparable else _SETTINGS_DIFFER,
    )


def _score(value: float | None, metric: Any, digits: int) -> str:
    """A score as the metric shows it: a percentage with ``digits`` decimals, or 3 decimals."""
    return pct(value, digits) if metric.percent else floatformat(value, 3)


def _experiment_cell(row: Any, metric: Any, scope: str) -> SafeString:
    teacher = None
    if row.teacher:
        score = format_html(" ({})", _score(row.teacher_accuracy, metric, 1)) \
            if row.teacher_accuracy else None
        teacher = format_html('<div class="muted small">teacher {}{}</div>', row.teacher, _join(score))
    return _join(
        format_html('<a href="{}">{}</a>', path_for(row.experiment.pk, "experiments:experiment_detail"),
                    row.experiment),
        format_html(' <span class="muted small">({})</span>', row.experiment.team)
        if scope == "global" else None,
        teacher,
    )


def _gain_cell(row: Any, metric: Any) -> SafeString:
    gain = row.kd_gain
    if gain is None:
        return _MISSING
    tone = "text-good" if gain > 0 else "text-bad" if gain < 0 else ""
    spread = None
    if row.kd_gain_std is not None:
        std = pp_unsigned(row.kd_gain_std, 2) if metric.percent else floatformat(row.kd_gain_std, 3)
        spread = format_html(' <span class="muted small">± {}</span>', std)
    return _join(format_html('<span class="{}">{}</span>', tone,
                             pp(gain, 2) if metric.percent else floatformat(gain, 3)), spread)


@register.simple_tag
def leaderboard_row(row: Any, metric: Any, scope: str) -> SafeString:
    """One ranked row of the leaderboard table (``experiments.selectors.leaderboard.LeaderboardRow``)."""
    label = f"{row.student} · {row.recipe}" + (f" · {row.sweep}" if row.sweep else "")
    student = _join(
        format_html('<a href="{}">{}</a>', path_for(row.student.pk, "experiments:model_detail"), row.student),
        format_html(' <span class="muted small">{}</span>', row.family) if row.family else None,
        format_html(_LORA, row.lora_r, row.adapter) if row.adapter else None,
    )
    recipe = _join(
        str(row.recipe),
        mark_safe(' <span class="tag tag-baseline">baseline</span>') if row.is_baseline else None,
        format_html(' <span class="tag">{}</span>', row.stage) if row.stage else None,
        format_html(_SWEEP, row.sweep) if row.sweep else None,
    )
    mean = _join(
        format_html("<strong>{}</strong>", _score(row.mean, metric, 2)),
        format_html(" ± {}", _score(row.std, metric, 2)) if row.seeds > 1 else None,
        format_html(' <span class="muted small">(n={})</span>', row.seeds),
    )
    retention = pct(row.retention, 1) if row.retention is not None else _MISSING
    compression = format_html("{}×", floatformat(row.compression, 1)) if row.compression else _MISSING
    pareto = format_html('<span class="tag pareto-flag" title="On the Pareto frontier ({} vs parameters)">★ '
                         'Pareto</span>', metric.label.lower()) if row.pareto else ""
    runs = format_html_join("", _RUN, ((path_for(i, "experiments:run_detail"), i,
                                        path_for(i, "experiments:run_config_json")) for i in row.run_ids))
    if row.stores:
        runs = _join(runs, format_html(_STORE, row.stores))
    classes = ("baseline" if row.is_baseline else "") + (" pareto" if row.pareto else "")
    return format_html(
        _ROW, classes, ",".join(map(str, row.run_ids)), label, row.rank, student, recipe,
        _experiment_cell(row, metric, scope), mean, retention, _gain_cell(row, metric), compact(row.params),
        compression, latency_cell(row.latency), speedup_cell(row.speedup_interval), pareto, runs,
    )
