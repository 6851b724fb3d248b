"""The dossier PDF: layout with reportlab platypus, fixed wording from forensics/report/templates/dossier.yaml, and
``build_dossier``, which renders figures, lays out the PDF, attaches the evidence files and signs it."""

from __future__ import annotations

import io
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

import yaml
from matplotlib import get_data_path
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import cm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.pdfgen import canvas as rl_canvas
from reportlab.platypus import (Flowable, Image, KeepTogether, ListFlowable, ListItem, PageBreak, Paragraph,
                                SimpleDocTemplate, Spacer, Table, TableStyle)
from rich.markup import escape as rich_escape

import forensics
from forensics.errors import ForensicsError
from forensics.evidence import attestation
from forensics.evidence.atomic import atomic_write_bytes
from forensics.evidence.hashing import sha256_bytes
from forensics.evidence.manifest import canonical_json_bytes, results_bytes
from forensics.progress import err
from forensics.report import figures as figs
from forensics.report.signing import Attachment, SignerIdentity, SigningConfig, load_signer, sign_pdf
from forensics.report.view import AGGREGATE, DossierView, Rate
from forensics.report.verify import CASE_YAML, MANIFEST, RESULTS, SIGNER_CERT

TEMPLATES_ENV = "FORENSICS_TEMPLATES_DIR"
WORDING_FILE = "dossier.yaml"
PDF_NAME = "dossier.pdf"
NA = "n/a"
PAGE_W, PAGE_H = A4
MARGIN = 2 * cm
TEXT_W = PAGE_W - 2 * MARGIN
# DejaVu ships with matplotlib and covers Latin, Greek and Cyrillic names; embedding it keeps the PDF self-contained.
FONTS = {"Sans": "DejaVuSans.ttf", "Sans-Bold": "DejaVuSans-Bold.ttf", "Sans-Italic": "DejaVuSans-Oblique.ttf",
         "Sans-BoldItalic": "DejaVuSans-BoldOblique.ttf", "Mono": "DejaVuSansMono.ttf"}
SANS_FACES = ("Sans", "Sans-Bold", "Sans-Italic", "Sans-BoldItalic")
# Characters DejaVu lacks (Chinese, Japanese, Korean names) are set, run by run, in the first of these fonts that has
# them, where installed (.ci/run installs Debian's fonts-wqy-microhei). reportlab embeds TrueType outlines only: these
# TTCs have them; Noto Sans CJK's CFF outlines it cannot embed.
FALLBACK_FONTS = (("Fallback-WenQuanYiMicroHei", "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"),
                  ("Fallback-WenQuanYiZenHei", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),
                  ("Fallback-ARPLUMing", "/usr/share/fonts/truetype/arphic/uming.ttc"))
GRID = colors.HexColor("#999999")
HEAD_BG = colors.HexColor("#e8e8e8")
MONO_STYLES = ("mono", "covermono")


def templates_dir() -> Path:
    if os.environ.get(TEMPLATES_ENV):
        return Path(os.environ[TEMPLATES_ENV])
    return Path(__file__).resolve().parent / "templates"


def load_wording() -> tuple[dict, str]:
    """The dossier's fixed wording and the SHA-256 of the file it came from."""
    path = templates_dir() / WORDING_FILE
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ForensicsError(path, f"cannot read dossier wording: {e.strerror or e} (set {TEMPLATES_ENV})") from e
    try:
        wording = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ForensicsError(path, f"invalid YAML: {e}") from e
    return wording, sha256_bytes(raw)


@dataclass(frozen=True)
class Fonts:
    """Which characters each style font can show, and the fallback fonts for the rest (reportlab has no fallback
    of its own: a character the font lacks is drawn as an empty box)."""

    covered: dict[str, frozenset[int]]  # style font name -> code points all faces it may switch to (<b>, <i>) have
    fallbacks: tuple[tuple[str, frozenset[int]], ...]

    def markup(self, text: str, font: str, missing: set[str]) -> str:
        """``text`` (paragraph markup) with each run of characters ``font`` lacks wrapped in <font name=...> of the
        first fallback that has them; characters none has are added to ``missing`` and left as they are. Markup and
        entities are ASCII, which every style font covers, so no tag is ever split."""
        if text.isascii():
            return text
        covered = self.covered.get(font, self.covered["Sans"])
        out: list[str] = []
        run: list[str] = []
        run_font = None

        def flush() -> None:
            if run:
                piece = "".join(run)
                out.append(f'<font name="{run_font}">{piece}</font>' if run_font else piece)
                run.clear()

        for ch in text:
            target = None
            if ord(ch) >= 128 and ord(ch) not in covered:
                target = next((name for name, cmap in self.fallbacks if ord(ch) in cmap), None)
                if target is None:
                    missing.add(ch)
            if target != run_font:
                flush()
                run_font = target
            run.append(ch)
        flush()
        return "".join(out)


@cache
def _register_fonts() -> Fonts:
    font_dir = Path(get_data_path()) / "fonts" / "ttf"
    for name, file in FONTS.items():
        pdfmetrics.registerFont(TTFont(name, str(font_dir / file)))
    pdfmetrics.registerFontFamily("Sans", normal="Sans", bold="Sans-Bold", italic="Sans-Italic",
                                  boldItalic="Sans-BoldItalic")
    fallbacks = []
    for name, path in FALLBACK_FONTS:
        if Path(path).is_file():
            font = TTFont(name, path, subfontIndex=0)
            pdfmetrics.registerFont(font)
            # Its own family, so that <b> or <i> around a fallback run still finds a face.
            pdfmetrics.registerFontFamily(name, normal=name, bold=name, italic=name, boldItalic=name)
            fallbacks.append((name, frozenset(font.face.charToGlyph)))
    cmaps = {name: frozenset(pdfmetrics.getFont(name).face.charToGlyph) for name in FONTS}
    sans = frozenset.intersection(*(cmaps[f] for f in SANS_FACES))
    return Fonts({**{f: sans for f in SANS_FACES}, "Mono": cmaps["Mono"]}, tuple(fallbacks))


def _styles() -> dict[str, ParagraphStyle]:
    base = ParagraphStyle("body", fontName="Sans", fontSize=9.5, leading=13.5, spaceAfter=6)
    cell = ParagraphStyle("cell", parent=base, fontSize=7.5, leading=9.5, spaceAfter=0)
    return {
        "body": base,
        "title": ParagraphStyle("title", parent=base, fontName="Sans-Bold", fontSize=22, leading=27, spaceAfter=8),
        "subtitle": ParagraphStyle("subtitle", parent=base, fontSize=12, leading=16, textColor=colors.HexColor(
            "#444444"), spaceAfter=24),
        "h1": ParagraphStyle("h1", parent=base, fontName="Sans-Bold", fontSize=15, leading=19, spaceBefore=6,
                             spaceAfter=10),
        "h2": ParagraphStyle("h2", parent=base, fontName="Sans-Bold", fontSize=11.5, leading=15, spaceBefore=10,
                             spaceAfter=6),
        "notice": ParagraphStyle("notice", parent=base, fontSize=9, leading=12.5, borderColor=GRID,
                                 borderWidth=0.6, borderPadding=7, backColor=colors.HexColor("#f6f6f6"),
                                 leftIndent=7, rightIndent=7, spaceBefore=24, spaceAfter=14),
        "cell": cell,
        "cover": ParagraphStyle("cover", parent=base, spaceAfter=0),
        "coverb": ParagraphStyle("coverb", parent=base, fontName="Sans-Bold", spaceAfter=0),
        "covermono": ParagraphStyle("covermono", parent=base, fontName="Mono", fontSize=8.5, leading=11,
                                    spaceAfter=0),
        "cellb": ParagraphStyle("cellb", parent=cell, fontName="Sans-Bold"),
        "muted": ParagraphStyle("muted", parent=cell, textColor=colors.HexColor("#777777")),
        "mono": ParagraphStyle("mono", parent=cell, fontName="Mono", fontSize=6.8, leading=8.6),
        "code": ParagraphStyle("code", parent=base, fontName="Mono", fontSize=7.8, leading=10, spaceAfter=4,
                               backColor=colors.HexColor("#f2f2f2"), borderPadding=(3, 4, 3, 4), leftIndent=4,
                               rightIndent=4),
        "caption": ParagraphStyle("caption", parent=base, fontSize=8, leading=10.5, alignment=TA_CENTER,
                                  textColor=colors.HexColor("#333333"), spaceBefore=2, spaceAfter=12),
        "small": ParagraphStyle("small", parent=base, fontSize=8, leading=10.5),
    }


# -- formatting: every number in the dossier goes through one of these ------------------------------------------

def f_num(x: float | None, digits: int = 3) -> str:
    return NA if x is None else f"{x:.{digits}f}"


def f_p(p: float | None, floor: float | None = None) -> str:
    """A p-value; at the smallest value its test can give (1/(T+1) for T resamples or 1/(n+1) for n null pairs) it
    is stated as a bound, because the test cannot resolve anything smaller."""
    if p is None:
        return NA
    if floor and p <= floor * (1 + 1e-9):
        return f"≤ {floor:.2g}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.2g}"


def f_ci(ci: tuple[float, float] | None) -> str:
    return NA if ci is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def f_pct(x: float | None) -> str:
    return NA if x is None else f"{x:.1f}%"


def f_rate(r: Rate, long: bool = False) -> str:
    """``1.1%``, or long: ``1.1% (1 of 90 unrelated pairs; 95% CI 0.03%–6%)``."""
    if r.rate is None:
        return NA
    text = f"{100 * r.rate:.1f}%"
    if long:
        details = []
        if r.n:
            details.append(f"{r.count if r.count is not None else round(r.rate * r.n)} of {r.n} unrelated pairs")
        if r.ci:
            details.append(f"95% CI {100 * r.ci[0]:.2g}%–{100 * r.ci[1]:.2g}%")
        text += f" ({'; '.join(details)})" if details else ""
    return text


def _drawn(neurons: int, layers) -> str:
    """How many suspect neurons the matching drew: per layer, and per unit where a layer has several (results written
    before units recorded their share say only the setting)."""
    units = [u for layer in layers for u in layer.units]
    if any(u.neurons is None for u in units):
        return f"{neurons} neurons per unit"
    totals = sorted({sum(u.neurons for u in layer.units) for layer in layers})
    per_unit = sorted({u.neurons for layer in layers for u in layer.units if len(layer.units) > 1})
    each = f" ({' or '.join(map(str, per_unit))} from each of its FFN units)" if per_unit else ""
    return f"{' or '.join(map(str, totals))} neurons drawn per layer{each}"


def _hash(h: str | None) -> str:
    """A 64-digit hash as two fixed 32-digit lines, so it never wraps at a random place."""
    if not h:
        return NA
    h = escape(h)
    return h if len(h) <= 32 else f"{h[:32]}<br/>{h[32:]}"


def _flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts and lists as ``a.b[0].c`` keys with text values, for key/value tables."""
    if isinstance(d, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in d.items()]
    elif isinstance(d, list) and any(isinstance(v, (Mapping, list)) for v in d):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(d)]
    else:
        return [(prefix, NA if d is None else ", ".join(map(str, d)) if isinstance(d, list) else str(d))]
    return [row for k, v in items for row in _flatten(v, k)]


class _Story:
    """Builds the list of flowables, one method per chapter; chapters are numbered as they are added."""

    def __init__(self, view: DossierView, manifest: Mapping, figures: Mapping[str, list[Path]],
                 signer: SignerIdentity, wording: Mapping):
        self.view, self.manifest, self.figures, self.signer, self.w = view, manifest, figures, signer, wording
        self.s = _styles()
        self.fonts = _register_fonts()
        self.missing: set[str] = set()  # characters no embedded font has
        self.flow: list = []
        self.figure_no = 0
        self.chapter_no = 0

    # small building blocks

    def para(self, text: str, style: ParagraphStyle) -> Paragraph:
        """Every paragraph goes through here, so that any character its font lacks gets a fallback font."""
        return Paragraph(self.fonts.markup(text, style.fontName, self.missing), style)

    def p(self, text: str, style: str = "body", hold: list | None = None) -> None:
        """Add a paragraph to the story, or to ``hold`` when it must stay on the page of what follows."""
        (self.flow if hold is None else hold).append(self.para(text, self.s[style]))

    def text(self, template: str, **values) -> str:
        """Fill a wording template; values are escaped, the template's own markup is kept."""
        return template.format(**{k: escape(str(v)) for k, v in values.items()})

    def chapter(self, heading: str, hold: list | None = None) -> None:
        self.chapter_no += 1
        self.p(escape(f"{self.chapter_no}. {heading}"), "h1", hold)

    def cell(self, text: str, style: str = "cell", raw: bool = False) -> Paragraph:
        return self.para(text if raw else escape(str(text)), self.s[style])

    def table(self, header: list[str], rows: list[list], widths: list[float], extra: list | None = None) -> Table:
        data = [[self.cell(h, "cellb") for h in header]] + rows
        t = Table(data, colWidths=[w * TEXT_W / sum(widths) for w in widths], repeatRows=1, hAlign="LEFT")
        style = [("GRID", (0, 0), (-1, -1), 0.4, GRID), ("BACKGROUND", (0, 0), (-1, 0), HEAD_BG),
                 ("VALIGN", (0, 0), (-1, -1), "TOP"), ("TOPPADDING", (0, 0), (-1, -1), 2.5),
                 ("BOTTOMPADDING", (0, 0), (-1, -1), 2.5), ("LEFTPADDING", (0, 0), (-1, -1), 3),
                 ("RIGHTPADDING", (0, 0), (-1, -1), 3)]
        style += [("BACKGROUND", (0, i), (-1, i), colors.HexColor("#f7f7f7")) for i in range(2, len(data), 2)]
        t.setStyle(TableStyle(style + (extra or [])))
        return t

    def kv(self, rows: list[tuple[str, str, str]], widths=(1, 3), label_style: str = "cellb") -> Flowable:
        """Label/value rows; each row names its value's style, and a ``mono``-style value is markup (a hash with
        its line break), any other is plain text."""
        if not rows:
            return self.cell(NA, "body")
        t = Table([[self.cell(k, label_style), self.cell(v, style, raw=style in MONO_STYLES)]
                   for k, v, style in rows], colWidths=[w * TEXT_W / sum(widths) for w in widths], hAlign="LEFT")
        t.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LINEBELOW", (0, 0), (-1, -1), 0.3, GRID),
                               ("LEFTPADDING", (0, 0), (-1, -1), 0), ("TOPPADDING", (0, 0), (-1, -1), 2.5),
                               ("BOTTOMPADDING", (0, 0), (-1, -1), 3)]))
        return t

    def figure(self, path: Path, caption: str, lead: list | None = None, **values) -> None:
        """A figure at its natural size (shrunk only to fit), kept on one page with its caption and with ``lead``
        (the heading and text that introduce it, so they are never stranded at the foot of a page)."""
        img = Image(str(path))
        scale = min(72 / figs.DPI, TEXT_W / img.imageWidth, 19 * cm / img.imageHeight)
        img.drawWidth, img.drawHeight = img.imageWidth * scale, img.imageHeight * scale
        self.figure_no += 1
        self.flow.append(KeepTogether((lead or []) + [img, self.para(
            self.text(caption, n=self.figure_no, **values), self.s["caption"])]))

    # chapters

    def cover(self) -> None:
        w, v, m, f = self.w["cover"], self.view, self.manifest, self.w["cover"]["fields"]
        self.flow.append(Spacer(1, 2.5 * cm))
        self.p(escape(v.case.title or self.w["title_default"]), "title")
        self.p(escape(w["subtitle"]), "subtitle")
        created = str(m.get("created_at", NA)).replace("T", " ").replace("Z", " UTC")
        rows = [(f["case_id"], v.case.id, "cover")]
        if v.case.analyst:
            rows.append((f["analyst"], v.case.analyst + (f", {v.case.organisation}" if v.case.organisation else ""),
                         "cover"))
        rows += [(f["date"], created + (f" (case dated {v.case.date})" if v.case.date else ""), "cover"),
                 (f["tool"], f"llm-forensics {m.get('tool', {}).get('version', NA)}", "cover"),
                 (f["dossier_id"], str(m.get("dossier_id", NA)), "cover"),
                 (f["signer"], f"{self.signer.subject} ({self.signer.key_algorithm})", "cover"),
                 (f["cert"], _hash(self.signer.certificate_sha256), "covermono"),
                 (f["chain"], " ← ".join(self.signer.chain) if self.signer.chain else
                  w["self_signed_chain"] if self.signer.self_signed else w["no_chain"], "cover"),
                 (f["timestamp"], w["timestamp"].format(tsa=tsa) if (tsa := (m.get("signer") or {}).get(
                     "timestamp_authority")) else w["no_timestamp"], "cover")]
        self.flow.append(self.kv(rows, widths=(0.34, 0.66), label_style="coverb"))
        if v.case.parties:
            self.p(escape(w["parties_heading"]), "h2")
            self.flow.append(self.kv([(role or "—", name, "cover") for role, name in v.case.parties],
                                     widths=(0.34, 0.66), label_style="coverb"))
        if v.case.description:
            self.flow.append(Spacer(1, 8))
            self.p(escape(v.case.description))
        local = self.signer.self_signed or self.signer.generated_locally
        self.p(w["self_signed_notice"] if local else w["ca_notice"], "notice")
        self.cover_end = len(self.flow)  # where build() puts the note on characters no font could show
        self.flow.append(PageBreak())

    def summary(self) -> None:
        w, v = self.w["summary"], self.view
        self.chapter(w["heading"])
        self.p(self.text(w["intro"], suspect=v.suspect, n_candidates=len(v.candidates)))
        routes = {c.name: {r.name: r for r in c.routes} for c in v.candidates}
        rows = [[self.cell(c.name), self.cell(c.verdict, "cellb"),
                 self.cell(routes[c.name][c.route].label if c.route else NA),
                 self.cell(f_p(c.p, routes[c.name][c.route].floor if c.route else None)), self.cell(f_p(c.p_adjusted)),
                 self.cell(", ".join(r.label for r in c.routes if r.role == "supports") or "—")]
                for c in v.candidates]
        self.p(escape(w["table_heading"]), "h2")
        self.flow.append(self.table(w["table_columns"], rows, [3.0, 2.3, 2.3, 1.5, 1.6, 2.3]))
        self.p(escape(w["na_note"]), "small")
        for c in v.candidates:
            # The verdict's meaning is template text with its own markup, so it is filled in unescaped.
            block = [Spacer(1, 4), self.para(w["candidate_line"].format(
                candidate=escape(c.name), verdict=escape(c.verdict), meaning=w["verdicts"].get(c.verdict, "")),
                self.s["body"])]
            decided = routes[c.name].get(c.route) if c.route else None
            if decided:
                block.append(self.para(self.text(
                    w["evidence_line"], route=decided.label, what=decided.what, p=f_p(c.p, decided.floor),
                    multitest=v.multitest or NA, p_adj=f_p(c.p_adjusted), error_rate=c.error_rate or NA),
                    self.s["body"]))
            block.append(self.para(self.text(w["routes_line"], routes="; ".join(
                f"{r.label}: {r.role}" + (f" (p {f_p(r.p, r.floor)})" if r.p is not None else f" ({r.what})")
                for r in c.routes)), self.s["body"]))
            if c.primary_signal:
                block.append(self.para(self.text(
                    w["std_line"], signal=c.primary_signal, statistic=f_num(c.statistic), ci=f_ci(c.ci),
                    p_perm=f_p(c.p_permutation, c.p_permutation_floor),
                    n_null=c.n_null if c.n_null is not None else NA,
                    p_emp=f_p(c.p_empirical, 1 / (c.n_null + 1) if c.n_null else None),
                    null_percentile=f_pct(c.null_percentile)), self.s["small"]))
            if c.reasons:
                block.append(self.para(escape(w["reasons_heading"]) + " " + escape("; ".join(c.reasons)) + ".",
                                       self.s["small"]))
            if c.tamper and c.tamper.statement:
                block.append(self.para(escape(c.tamper.statement), self.s["notice"]))
            self.flow.append(KeepTogether(block))
        # One rule for every candidate; a candidate decided by neuron matching quotes no measured rate (its own
        # error-rate line says the test is exact), so the rule and its measured rate are printed once.
        for rule in sorted({c.rule or NA for c in v.candidates}):
            self.p(self.text(w["rule_line"], rule=rule), "notice")
            measured = sorted({c.fpr for c in v.candidates if (c.rule or NA) == rule and c.fpr.rate is not None},
                              key=str)
            if not measured:
                self.p(escape(w["fpr_unmeasured"]))
            for fpr in measured:
                self.p(self.text(w["fpr_line"], fpr=f_rate(fpr, long=True)))
                if fpr.design:
                    self.p(escape(fpr.design), "small")
        self.flow.append(PageBreak())

    def models(self) -> None:
        w, v = self.w["models"], self.view
        self.chapter(w["heading"])
        self.p(escape(w["intro"]))
        order = {role: i for i, role in enumerate(("suspect", "candidate", "control", "panel"))}
        rows = []
        for m in sorted(v.models.values(), key=lambda m: (order.get(m.role, 9), m.name)):
            origin = "; ".join(x for x in (m.claimed_origin, m.notes) if x) or "—"
            rows.append([self.cell(m.name), self.cell(m.role), self.cell(m.architecture or NA),
                         self.cell(str(m.num_layers) if m.num_layers is not None else NA),
                         self.cell(escape(m.path or NA), "mono", raw=True), self.cell(origin)])
        self.flow.append(self.table(w["columns"], rows, [2.4, 1.6, 2.1, 1.3, 4.8, 3.8]))
        self.flow.append(Spacer(1, 14))

    def method(self) -> None:
        w = self.w["method"]
        self.chapter(w["heading"])
        for para in w["paragraphs"]:
            self.p(para)
        self.flow.append(PageBreak())

    def signals(self) -> None:
        w, v = self.w["signals"], self.view
        lead: list = []
        self.chapter(w["heading"], hold=lead)
        status_text = w["status"]
        for i, (kind, labels) in enumerate(v.signal_kinds.items(), start=1):
            title = w["kind_titles"].get(kind, kind)
            self.p(escape(f"{self.chapter_no}.{i} {title}"), "h2", hold=lead)
            self.p(w["kinds"].get(kind, w["kinds"]["other"]), hold=lead)
            for path in self.figures.get(f"curves:{kind}", []):
                self.figure(path, w["figure_caption"], lead=lead, title=title)
                lead = []
            self.flow += lead
            lead = []
            aggregate = kind == AGGREGATE
            rows, muted = [], False
            for c in v.candidates:
                for label in labels:
                    s = c.signals.get(label)
                    if s is None:
                        continue
                    compared = s.status == "compared"
                    muted |= not compared
                    name = label + ("" if compared else f" ({status_text.get(s.status, s.status)})")
                    cells = ([c.name, name] + ([", ".join(s.roles) or NA] if aggregate else [])
                             + [f_num(s.r), f_num(s.spearman), f_p(s.pvalue, s.p_floor), f_p(s.p_adjusted),
                                f_ci(s.ci), f_pct(s.null_percentile)]
                             + ([] if aggregate else [s.alignment or NA]))
                    rows.append([self.cell(x, "cell" if compared else "muted") for x in cells])
            columns = w["aggregate_columns"] if aggregate else w["table_columns"]
            widths = [2.3, 1.9, 2.2, 1.1, 1.6, 1.4, 1.4, 2.0, 1.5] if aggregate else \
                [2.4, 1.7, 1.1, 1.9, 1.6, 1.4, 2.1, 1.5, 2.0]
            self.flow.append(self.table(columns, rows, widths))
            if muted:
                self.p(escape(w["status_note"]), "small")
        self.flow.append(PageBreak())

    def invariant(self) -> None:
        w, v = self.w["invariant"], self.view
        tested = [c for c in v.candidates if c.neurons]
        if not tested:
            return
        self.chapter(w["heading"])
        for para in w["paragraphs"]:
            self.p(para)
        if v.neuron_rule:
            self.p(self.text(w["rule_line"], rule=v.neuron_rule), "notice")
        for c in tested:
            n = c.neurons
            self.p(escape(f"{c.name}: {n.conclusion or NA}"), "h2")
            if n.status != "compared":
                self.p(self.text(w["unavailable"], reason=n.reason or NA))
                continue
            a, fisher, settings = n.alignment, n.fisher, n.settings
            self.p(self.text(
                w["result_line"], statistic=f_num(n.statistic), null_mean=f_num(n.null.mean),
                null_max=f_num(n.null.max), p=f_p(n.pvalue, n.floor),
                draws=f"the first {n.draws} of {n.n_permutations} random reorderings, stopped once p could not "
                      f"fall below the significance level" if n.stopped else f"{n.n_permutations} random reorderings",
                p_adj=f_p(n.pvalue_adjusted), fisher=f_p(fisher.pvalue), df=fisher.df, parts=", ".join(n.parts),
                neurons=_drawn(settings.neurons, n.layers), dims=settings.dims, how=a.how, quality=f_num(a.quality),
                chance=f_num(next(t.chance_mean for t in a.tried if t.how == a.how)),
                sd=f_num(next(t.chance_sd for t in a.tried if t.how == a.how)),
                widths=f"{a.suspect_width} of {a.candidate_width}" if a.suspect_width != a.candidate_width
                else str(a.suspect_width),
                tokens=f"{a.tokens_used} of {a.shared_tokens} shared tokens" if a.shared_tokens else "no shared token"))
            if c.tamper and c.tamper.statement:
                self.p(escape(c.tamper.statement), "notice")
            rows = []
            for layer in n.layers:
                units = layer.units
                targets = sorted({u.matches.label for u in units})
                same = [u.same_index_fraction for u in units]
                rows.append([self.cell(str(layer.layer)), self.cell(str(len(units))),
                             self.cell("; ".join(targets)), self.cell(f_num(layer.statistic)),
                             self.cell(f_p(layer.pvalue, n.floor)),
                             self.cell(f_pct(100 * sum(same) / len(same)) if same else NA)])
            self.flow.append(self.table(w["columns"], rows, [1.3, 1.3, 6.0, 1.9, 1.9, 2.4]))
            self.p(escape(w["columns_note"]), "small")
            if n.stopped:
                self.p(self.text(w["stopped_note"], draws=n.draws), "small")
        self.flow.append(PageBreak())

    def heatmap(self) -> None:
        w, lead = self.w["heatmap"], []
        self.chapter(w["heading"], hold=lead)
        self.p(w["text"], hold=lead)
        if "heatmap" not in self.figures:
            self.p(escape(w["missing"]), hold=lead)
            self.flow += lead
            return
        self.figure(self.figures["heatmap"][0], w["caption"], lead=lead)

    def null(self) -> None:
        w, v, lead = self.w["null_distribution"], self.view, []
        self.chapter(w["heading"], hold=lead)
        if not v.nulls:
            self.p(escape(w["missing"]), hold=lead)
        for null in v.nulls:
            paths = self.figures.get(f"null:{null.label}")
            if paths:
                self.p(self.text(w["text"], n=len(null.values), signal=null.label), hold=lead)
                self.figure(paths[0], w["caption"], lead=lead, signal=null.label)
                lead = []  # the figure keeps the heading and text with it
            else:
                self.p(self.text(w["no_values"], n=null.n if null.n is not None else NA, signal=null.label,
                                 median=f_num(null.median), maximum=f_num(null.maximum)), hold=lead)
            self.flow += lead
            lead = []
        self.flow += lead
        if v.null_members:
            self.p(escape(w["members_heading"]) + " " + escape("; ".join(v.null_members)), "small")
        for name, reason in v.null_excluded:
            self.p(self.text(w["excluded_line"], name=name, reason=reason), "small")
        self.flow.append(PageBreak())

    def limitations(self) -> None:
        w = self.w["limitations"]
        self.chapter(w["heading"])
        self.p(escape(w["intro"]))
        self.flow.append(ListFlowable([ListItem(self.para(item, self.s["body"]), leftIndent=14)
                                       for item in w["items"]], bulletType="bullet", start="•", leftIndent=14))
        self.flow.append(PageBreak())

    def custody(self) -> None:
        w, m = self.w["custody"], self.manifest
        self.chapter(w["heading"])
        self.p(escape(w["intro"]))
        rows = [[self.cell(r.get("model", "—")), self.cell(escape(r["path"]), "mono", raw=True),
                 self.cell(f"{r['size']:,}"), self.cell(_hash(r["sha256"]), "mono", raw=True)]
                for r in m.get("inputs", [])]
        self.flow.append(self.table(w["inputs_columns"], rows, [2.2, 6.6, 2.0, 5.2]))
        if m.get("inputs_base"):
            self.p(self.text(w["relative_note"], base=m["inputs_base"]), "small")

        self.p(escape(w["case_heading"]), "h2")
        cy = m.get("case_yaml") or {}
        self.flow.append(self.kv([("path", str(cy.get("path", NA)), "cell"), ("size (bytes)", f"{cy.get('size', NA)}",
                                  "cell"), ("SHA-256", _hash(cy.get("sha256")), "mono")]))

        self.p(escape(w["corpus_heading"]), "h2")
        corpus = _flatten({k: m[k] for k in ("corpus", "token_windows") if m.get(k)})
        if corpus:
            self.flow.append(self.kv([(k, _hash(val), "mono") if len(val) == 64 and k.endswith("sha256") else
                                      (k, val, "cell") for k, val in corpus]))
        else:
            self.p(escape(w["no_corpus"]))

        self.p(escape(w["command_heading"]), "h2")
        cmd = m.get("command") or {}
        self.p(escape(shlex.join(cmd.get("argv", []))) or NA, "code")
        if cmd.get("cwd"):
            self.p(self.text(w["cwd_note"], cwd=cmd["cwd"]), "small")

        self.p(escape(w["environment_heading"]), "h2")
        env = [(k, val, "cell") for k, val in _flatten(m.get("environment") or {})
               if val != NA or not k.startswith("packages.")]  # packages not installed: noise, not environment
        self.flow.append(self.kv(env, widths=(1, 2)))

        record: list = []
        self.p(escape(w["record_heading"]), "h2", hold=record)
        self.p(escape(w["record_text"]), hold=record)
        record.append(self.kv([(MANIFEST, _hash(sha256_bytes(canonical_json_bytes(m))), "mono"),
                               (RESULTS, _hash((m.get("results_digest") or {}).get("sha256")), "mono"),
                               (CASE_YAML, _hash(cy.get("sha256")), "mono"),
                               (SIGNER_CERT, _hash(sha256_bytes(self.signer.certificate_pem.encode("ascii"))),
                                "mono")]))
        self.flow.append(KeepTogether(record))
        self.flow.append(PageBreak())

    def verification(self) -> None:
        w = self.w["verify"]
        self.chapter(w["heading"])
        self.p(escape(w["intro"]))
        for step in w["steps"]:
            block = [self.para(escape(step["title"]), self.s["h2"]), self.para(escape(step["text"]), self.s["body"])]
            for cmd in step["commands"]:
                block += [self.para(escape(cmd.format(pdf=PDF_NAME)), self.s["code"]), Spacer(1, 5)]
            self.flow.append(KeepTogether(block))

    def build(self) -> list:
        for chapter in (self.cover, self.summary, self.models, self.method, self.signals, self.invariant,
                        self.heatmap, self.null,
                        self.limitations, self.custody, self.verification):
            chapter()
        if self.missing:
            codes = ", ".join(f"U+{ord(c):04X}" for c in sorted(self.missing))
            self.flow.insert(self.cover_end, self.para(self.text(self.w["cover"]["unrenderable_note"], chars=codes),
                                                       self.s["notice"]))
            hint = "" if self.fonts.fallbacks else (" (no fallback font is installed: for Chinese, Japanese and "
                                                     "Korean install Debian's fonts-wqy-microhei)")
            err.print("[bold yellow]warning:[/] " + rich_escape(
                f"no font embedded in the dossier has a glyph for {codes} "
                f"({' '.join(sorted(self.missing))}); they show as empty boxes, and the cover says so{hint}"),
                highlight=False)
        return self.flow


def _footer_canvas(footer: str, dossier_id: str, case_id: str):
    """A canvas that holds pages back until the end, so every footer can say "page N of M"."""

    class FooterCanvas(rl_canvas.Canvas):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._pages: list[dict] = []

        def showPage(self):
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self):
            for n, state in enumerate(self._pages, start=1):
                self.__dict__.update(state)
                self.setFont("Sans", 7.5)
                self.setFillColor(colors.HexColor("#555555"))
                self.setStrokeColor(GRID)
                self.setLineWidth(0.4)
                self.line(MARGIN, 1.45 * cm, PAGE_W - MARGIN, 1.45 * cm)
                self.drawCentredString(PAGE_W / 2, 1.05 * cm, footer.format(
                    dossier_id=dossier_id, case_id=case_id, page=n, pages=len(self._pages)))
                super().showPage()
            super().save()

    return FooterCanvas


def render_pdf(view: DossierView, manifest: Mapping, figures: Mapping[str, list[Path]], signer: SignerIdentity,
               wording: Mapping) -> bytes:
    """The unsigned dossier PDF as bytes."""
    _register_fonts()
    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf, pagesize=A4, leftMargin=MARGIN, rightMargin=MARGIN, topMargin=MARGIN, bottomMargin=2.2 * cm,
        title=f"{view.case.title or wording['title_default']} — case {view.case.id}",
        author=signer.subject, subject=f"Dossier {manifest.get('dossier_id')}, case {view.case.id}",
        creator=f"llm-forensics {forensics.__version__}", keywords="llm-forensics, model provenance")
    story = _Story(view, manifest, figures, signer, wording).build()
    doc.build(story, canvasmaker=_footer_canvas(wording["footer"], str(manifest.get("dossier_id")), view.case.id))
    return buf.getvalue()


def build_dossier(results: Mapping | bytes, manifest: Mapping, case_yaml_bytes: bytes, out_dir: str | Path,
                  signing_config: SigningConfig | None = None, case: Mapping | None = None) -> Path:
    """Write ``out_dir/figures/*.png``, ``out_dir/manifest.json`` and the signed ``out_dir/dossier.pdf``.

    ``results`` is the statistics output, as a dict or as the exact bytes of results.json; ``manifest`` comes from
    ``forensics.evidence.manifest.build_manifest`` over the same results and case file bytes; ``case`` describes the
    matter (the case file as a dict: id, title, analyst, organisation, parties, suspect/candidates/controls). The
    signer and the wording's hash are added to the manifest before it is written and attached. The PDF appears under
    its final name only once it is complete and signed.
    """
    out_dir = Path(out_dir)
    raw_results = results_bytes(results)
    view = DossierView.from_results(raw_results, case=case, case_id=manifest.get("case_id"))
    if (manifest.get("results_digest") or {}).get("sha256") != sha256_bytes(raw_results):
        raise ForensicsError(None, "the manifest was built over different results than the ones given")
    if (manifest.get("case_yaml") or {}).get("sha256") != sha256_bytes(case_yaml_bytes):
        raise ForensicsError(manifest.get("case_yaml", {}).get("path"),
                             "the case file changed between building the manifest and the dossier")
    wording, wording_sha = load_wording()
    signer = load_signer(signing_config)
    manifest = {**manifest, "signer": {**signer.identity.to_manifest(), "timestamp_authority": signer.tsa_url},
                "tool": {**manifest.get("tool", {}), "templates_sha256": wording_sha}}

    fig_dir = out_dir / "figures"
    figures = figs.render_all(view, fig_dir)
    made = {p.name for paths in figures.values() for p in paths}
    for old in fig_dir.glob("*.png"):  # a figure left from an earlier run of this case must not look current
        if old.name not in made:
            old.unlink()

    pdf = render_pdf(view, manifest, figures, signer.identity, wording)
    manifest_bytes = canonical_json_bytes(manifest)
    payload = attestation.payload_bytes(attestation.statement(manifest, raw_results, manifest_bytes))
    dsse = attestation.envelope(payload, signer.identity.certificate_sha256,
                                signer.sign_raw(attestation.pae(attestation.PAYLOAD_TYPE, payload)))
    attachments = [
        Attachment(attestation.FILE_NAME, dsse, "application/json",
                   "in-toto attestation of the finding (DSSE, signed with the dossier's key)"),
        Attachment(MANIFEST, manifest_bytes, "application/json", "Manifest: inputs, hashes, environment, command"),
        Attachment(CASE_YAML, bytes(case_yaml_bytes), "application/yaml", "Case file exactly as used"),
        Attachment(RESULTS, raw_results, "application/json", "All results of the statistics stage"),
        Attachment(SIGNER_CERT, signer.identity.certificate_pem.encode("ascii"), "application/x-pem-file",
                   "Certificate of the signing key"),
    ]
    signed = sign_pdf(pdf, signer, attachments, reason=f"llm-forensics dossier {manifest['dossier_id']}")
    pdf_path = atomic_write_bytes(out_dir / PDF_NAME, signed)
    # Copies beside the PDF, for tools that do not read PDFs; the ones attached to it are authoritative.
    atomic_write_bytes(out_dir / MANIFEST, manifest_bytes)
    atomic_write_bytes(out_dir / attestation.FILE_NAME, dsse)
    atomic_write_bytes(out_dir / SIGNER_CERT, signer.identity.certificate_pem.encode("ascii"))
    return pdf_path
