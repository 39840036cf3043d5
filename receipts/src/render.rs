//! The page: one A4 sheet, text in the standard-14 Helvetica faces, laid out by hand.
//!
//! printpdf writes the page and its fonts; the document it returns is then fixed up with
//! lopdf (the same lopdf printpdf uses) so that its bytes depend on the [`Document`] alone:
//! the info dictionary printpdf writes (creation and modification dates, empty fields) is
//! replaced by a title and a producer, and the file id it draws at random is replaced by
//! hashes of the document.

use std::sync::OnceLock;

use lopdf::{Object, StringFormat};
use printpdf::{
    BuiltinFont, Color, Greyscale, Line, LinePoint, Mm, Op, PdfDocument, PdfFontHandle, PdfPage,
    PdfSaveOptions, Point, Pt, TextItem,
};
use sha2::{Digest, Sha256};

use crate::{Document, Kind};

/// A4 (210 mm x 297 mm), in points.
const PAGE_WIDTH: f32 = 595.2756;
const PAGE_HEIGHT: f32 = 841.8898;
/// 20 mm.
const MARGIN: f32 = 56.69;
/// Where the values of the table start.
const VALUE_X: f32 = MARGIN + 120.0;
const TEXT_WIDTH: f32 = PAGE_WIDTH - 2.0 * MARGIN;
const VALUE_WIDTH: f32 = PAGE_WIDTH - MARGIN - VALUE_X;
const BODY_SIZE: f32 = 10.0;
const BODY_LEADING: f32 = 14.0;
/// Most lines one value (or the seller's name, or the statement) takes; a longer one ends in
/// `...`. With these the page can never overflow: the longest ids the model allows (a
/// 128-byte buyer id, a 64-character SKU) take at most 4 and 2 lines.
const MAX_VALUE_LINES: usize = 6;
/// Changes whenever the layout does, so that the file id's second half changes with it.
const LAYOUT_VERSION: &str = "flashsale receipts layout 1";

/// `doc` as a one-page PDF (version 1.3, about 2 KiB, streams not compressed).
///
/// **Deterministic**: the same document gives the same bytes, in any process at any time.
/// Nothing of the moment is written: no creation or modification date, and the file id
/// (`/ID`) is two hashes instead of random: of the document's kind and order id (the same
/// for every rendering of that order's document) and of the file's bytes without the id.
/// Bytes may differ between versions of this crate or of printpdf and lopdf; a stored
/// PDF is never rendered again to compare.
///
/// **Text**: Helvetica and Helvetica-Bold, two of the standard-14 fonts every PDF reader
/// provides, so no font is embedded and none is looked up on the machine; the text is
/// extractable (`pdftotext` and text-extraction libraries read the order id and amounts).
/// Their WinAnsi encoding holds ASCII, Latin-1 and a few more characters (`€`, `Š`, `ž`,
/// typographic quotes and dashes): every other character (CJK, Cyrillic, emoji, combining
/// marks, control characters) is written as `?`. Values too long for their column wrap,
/// at spaces where there are some; a value longer than six lines ends in `...`.
pub fn render(doc: &Document) -> Vec<u8> {
    let (ops, _) = page_ops(doc);
    let page = PdfPage::new(Mm(210.0), Mm(297.0), ops);
    let opts = PdfSaveOptions {
        optimize: false,
        subset_fonts: false,
        secure: true,
        image_optimization: None,
    };
    let mut warnings = Vec::new();
    let mut pdf = PdfDocument::new(doc.kind.title())
        .with_pages(vec![page])
        .to_lopdf_document(&opts, &mut warnings);

    // The info dictionary: printpdf's carries dates (of 1970, but dates) and empty fields.
    let info = lopdf::Dictionary::from_iter(vec![
        (
            "Title",
            Object::string_literal(format!("{} {}", doc.kind.title(), doc.order_id)),
        ),
        ("Producer", Object::string_literal("flashsale receipts")),
    ]);
    match pdf.trailer.get(b"Info").and_then(Object::as_reference) {
        Ok(id) => {
            pdf.objects.insert(id, Object::Dictionary(info));
        }
        Err(_) => {
            let id = pdf.add_object(info);
            pdf.trailer.set("Info", id);
        }
    }

    // The file id: printpdf draws both halves from a process-wide pseudo-random counter,
    // so two renderings in one process differ. Here the first half names the document
    // (kind and order) and the second this rendering of it (the bytes without an id).
    pdf.trailer.remove(b"ID");
    let unidentified = save(&mut pdf);
    let permanent = digest(&[
        LAYOUT_VERSION.as_bytes(),
        doc.kind.key_prefix().as_bytes(),
        doc.order_id.0.as_bytes(),
    ]);
    let instance = digest(&[LAYOUT_VERSION.as_bytes(), &unidentified]);
    pdf.trailer.set(
        "ID",
        Object::Array(vec![
            Object::String(permanent, StringFormat::Hexadecimal),
            Object::String(instance, StringFormat::Hexadecimal),
        ]),
    );
    save(&mut pdf)
}

fn save(pdf: &mut lopdf::Document) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4096);
    pdf.save_to(&mut bytes)
        .expect("writing a PDF into memory cannot fail");
    bytes
}

/// The first 16 bytes of the SHA-256 of `parts`, each preceded by its length.
fn digest(parts: &[&[u8]]) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize()[..16].to_vec()
}

/// Baseline of the footer's first line; the body ends well above it.
const FOOTER_Y: f32 = MARGIN + 8.0;

/// The page's drawing operations, and the lowest baseline of its body (above the footer).
fn page_ops(doc: &Document) -> (Vec<Op>, f32) {
    let mut page = Page::default();
    let mut y = PAGE_HEIGHT - MARGIN - 18.0;

    page.text(
        BuiltinFont::HelveticaBold,
        20.0,
        MARGIN,
        y,
        doc.kind.title(),
    );
    y -= 22.0;
    for line in wrap(&doc.seller, BuiltinFont::Helvetica, 12.0, TEXT_WIDTH) {
        page.text(BuiltinFont::Helvetica, 12.0, MARGIN, y, &line);
        y -= 15.0;
    }
    y += 15.0 - 12.0;
    page.rule(y);
    y -= 24.0;

    for (label, value) in doc.rows() {
        page.text(BuiltinFont::HelveticaBold, BODY_SIZE, MARGIN, y, label);
        for line in wrap(&value, BuiltinFont::Helvetica, BODY_SIZE, VALUE_WIDTH) {
            page.text(BuiltinFont::Helvetica, BODY_SIZE, VALUE_X, y, &line);
            y -= BODY_LEADING;
        }
        y -= 4.0;
    }

    y -= 12.0;
    for line in wrap(
        &doc.statement(),
        BuiltinFont::Helvetica,
        BODY_SIZE,
        TEXT_WIDTH,
    ) {
        page.text(BuiltinFont::Helvetica, BODY_SIZE, MARGIN, y, &line);
        y -= BODY_LEADING;
    }
    let body_bottom = y + BODY_LEADING;

    let footer = match doc.kind {
        Kind::Receipt => "Amounts in the currency shown; times in UTC (RFC 3339).",
        Kind::RefundNote => {
            "Amounts in the currency shown; times in UTC (RFC 3339). Keep this note with the \
             buyer's statement of the charge."
        }
    };
    page.ops.push(Op::SetFillColor {
        col: Color::Greyscale(Greyscale {
            percent: 0.35,
            icc_profile: None,
        }),
    });
    let mut y = FOOTER_Y;
    for line in wrap(footer, BuiltinFont::Helvetica, 8.0, TEXT_WIDTH) {
        page.text(BuiltinFont::Helvetica, 8.0, MARGIN, y, &line);
        y -= 10.0;
    }
    (page.ops, body_bottom)
}

#[derive(Default)]
struct Page {
    ops: Vec<Op>,
}

impl Page {
    /// One line of text with its baseline starting at (x, y), in its own text object so
    /// that its position is absolute. `text` must already be WinAnsi-safe ([`wrap`]).
    fn text(&mut self, font: BuiltinFont, size: f32, x: f32, y: f32, text: &str) {
        self.ops.extend([
            Op::StartTextSection,
            Op::SetFont {
                font: PdfFontHandle::Builtin(font),
                size: Pt(size),
            },
            Op::SetTextCursor {
                pos: Point { x: Pt(x), y: Pt(y) },
            },
            Op::ShowText {
                items: vec![TextItem::Text(text.to_owned())],
            },
            Op::EndTextSection,
        ]);
    }

    /// A thin horizontal rule across the text width at height `y`.
    fn rule(&mut self, y: f32) {
        let point = |x| LinePoint {
            p: Point { x: Pt(x), y: Pt(y) },
            bezier: false,
        };
        self.ops.push(Op::SetOutlineThickness { pt: Pt(0.5) });
        self.ops.push(Op::DrawLine {
            line: Line {
                points: vec![point(MARGIN), point(PAGE_WIDTH - MARGIN)],
                is_closed: false,
            },
        });
    }
}

/// The characters of WinAnsiEncoding (PDF 32000-1, Annex D.2) in 0x80..=0x9F, where it is
/// not Latin-1; the bytes 0x81, 0x8D, 0x8F, 0x90 and 0x9D are not used.
const WIN_ANSI_HIGH: [(u8, char); 27] = [
    (0x80, '\u{20AC}'),
    (0x82, '\u{201A}'),
    (0x83, '\u{0192}'),
    (0x84, '\u{201E}'),
    (0x85, '\u{2026}'),
    (0x86, '\u{2020}'),
    (0x87, '\u{2021}'),
    (0x88, '\u{02C6}'),
    (0x89, '\u{2030}'),
    (0x8A, '\u{0160}'),
    (0x8B, '\u{2039}'),
    (0x8C, '\u{0152}'),
    (0x8E, '\u{017D}'),
    (0x91, '\u{2018}'),
    (0x92, '\u{2019}'),
    (0x93, '\u{201C}'),
    (0x94, '\u{201D}'),
    (0x95, '\u{2022}'),
    (0x96, '\u{2013}'),
    (0x97, '\u{2014}'),
    (0x98, '\u{02DC}'),
    (0x99, '\u{2122}'),
    (0x9A, '\u{0161}'),
    (0x9B, '\u{203A}'),
    (0x9C, '\u{0153}'),
    (0x9E, '\u{017E}'),
    (0x9F, '\u{0178}'),
];

/// The WinAnsi byte of `c`, if the encoding has it.
fn win_ansi_byte(c: char) -> Option<u8> {
    match u32::from(c) {
        cp @ (0x20..=0x7E | 0xA0..=0xFF) => u8::try_from(cp).ok(),
        _ => WIN_ANSI_HIGH
            .iter()
            .find(|&&(_, high)| high == c)
            .map(|&(b, _)| b),
    }
}

/// `text` with every character the standard-14 fonts cannot show (not in WinAnsi) as `?`.
fn win_ansi_safe(text: &str) -> String {
    text.chars()
        .map(|c| if win_ansi_byte(c).is_some() { c } else { '?' })
        .collect()
}

/// Advance widths of one font for the WinAnsi bytes, in thousandths of an em.
struct Widths([u16; 256]);

impl Widths {
    /// Read from the metrics printpdf ships for the standard-14 fonts (no font is
    /// embedded: these only measure). A character whose width is unknown counts as a full
    /// em, wider than any Helvetica glyph, so lines are never too long.
    fn of(font: BuiltinFont) -> Widths {
        let mut widths = [1000u16; 256];
        let parsed = font.get_parsed_font();
        for (byte, width) in widths.iter_mut().enumerate() {
            let Some(c) = win_ansi_char(byte as u8) else {
                continue;
            };
            if c == ' ' || c == '\u{A0}' {
                // The shipped metrics have no space glyph; Helvetica's (both weights) is
                // 278 in the font's AFM.
                *width = 278;
                continue;
            }
            let Some(font) = &parsed else { continue };
            let units = font
                .lookup_glyph_index(u32::from(c))
                .and_then(|gid| font.get_glyph_width(gid));
            if let (Some(units), true) = (units, font.units_per_em > 0) {
                let upm = u32::from(font.units_per_em);
                let thousandths = (u32::from(units) * 1000 + upm / 2) / upm;
                *width = u16::try_from(thousandths.max(1)).unwrap_or(1000);
            }
        }
        Widths(widths)
    }

    fn get(font: BuiltinFont) -> &'static Widths {
        static REGULAR: OnceLock<Widths> = OnceLock::new();
        static BOLD: OnceLock<Widths> = OnceLock::new();
        match font {
            BuiltinFont::HelveticaBold => BOLD.get_or_init(|| Widths::of(font)),
            _ => REGULAR.get_or_init(|| Widths::of(BuiltinFont::Helvetica)),
        }
    }

    /// Width of `c` at `size` points.
    fn advance(&self, c: char, size: f32) -> f32 {
        let units = win_ansi_byte(c).map_or(1000, |b| self.0[usize::from(b)]);
        f32::from(units) * size / 1000.0
    }

    fn measure(&self, text: &str, size: f32) -> f32 {
        text.chars().map(|c| self.advance(c, size)).sum()
    }
}

fn win_ansi_char(byte: u8) -> Option<char> {
    match byte {
        0x20..=0x7E | 0xA0..=0xFF => Some(char::from(byte)),
        _ => WIN_ANSI_HIGH
            .iter()
            .find(|&&(b, _)| b == byte)
            .map(|&(_, c)| c),
    }
}

/// `text`, made WinAnsi-safe, in lines no wider than `max` points in `font` at `size`:
/// broken at the last space that fits, or anywhere in a word longer than a line; at most
/// [`MAX_VALUE_LINES`], the last one ending in `...` if text was cut. Always at least one
/// line (an empty value is an empty line). A no-break space (U+00A0) glues the words on
/// either side (an amount and its currency) and is written as a plain space.
fn wrap(text: &str, font: BuiltinFont, size: f32, max: f32) -> Vec<String> {
    let widths = Widths::get(font);
    let text = win_ansi_safe(text);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    let mut width = 0.0f32;
    for c in text.chars() {
        let advance = widths.advance(c, size);
        if width + advance <= max || line.is_empty() {
            line.push(c);
            width += advance;
            continue;
        }
        if c == ' ' {
            lines.push(std::mem::take(&mut line).trim_end().to_owned());
            width = 0.0;
            continue;
        }
        match line.rfind(' ') {
            Some(space) if !line[..space].trim_end().is_empty() => {
                let rest = line[space + 1..].to_owned();
                line.truncate(space);
                lines.push(std::mem::take(&mut line).trim_end().to_owned());
                line = rest;
            }
            _ => lines.push(std::mem::take(&mut line)),
        }
        line.push(c);
        width = widths.measure(&line, size);
    }
    lines.push(line);

    if lines.len() > MAX_VALUE_LINES {
        lines.truncate(MAX_VALUE_LINES);
        if let Some(last) = lines.last_mut() {
            let ellipsis = widths.measure("...", size);
            while !last.is_empty() && widths.measure(last, size) + ellipsis > max {
                last.pop();
            }
            last.push_str("...");
        }
    }
    for line in &mut lines {
        if line.contains(NO_BREAK_SPACE) {
            *line = line.replace(NO_BREAK_SPACE, " ");
        }
    }
    lines
}

const NO_BREAK_SPACE: char = '\u{A0}';

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_outside_win_ansi_become_question_marks() {
        assert_eq!(win_ansi_safe("Zoë Ω 用户 € “x” 😀"), "Zoë ? ?? € “x” ?");
        assert_eq!(win_ansi_safe("a\u{0301}\t\u{85}b"), "a???b");
        for b in 0u8..=255 {
            if let Some(c) = win_ansi_char(b) {
                assert_eq!(win_ansi_byte(c), Some(b), "{c:?}");
            }
        }
    }

    #[test]
    fn helvetica_widths_come_from_its_metrics() {
        let w = Widths::get(BuiltinFont::Helvetica);
        // Helvetica.afm: a 556, W 944, space 278, i 222.
        assert_eq!(w.0[usize::from(b'a')], 556);
        assert_eq!(w.0[usize::from(b'W')], 944);
        assert_eq!(w.0[usize::from(b' ')], 278);
        assert_eq!(w.0[usize::from(b'i')], 222);
        // Helvetica-Bold.afm: a 556, W 944, i 278.
        let b = Widths::get(BuiltinFont::HelveticaBold);
        assert_eq!(b.0[usize::from(b'i')], 278);
    }

    #[test]
    fn long_values_wrap_at_spaces_or_anywhere_and_are_cut_after_six_lines() {
        let font = BuiltinFont::Helvetica;
        let lines = wrap("aaaa bbbb cccc", font, 10.0, 60.0);
        assert_eq!(lines, ["aaaa bbbb", "cccc"]);
        let lines = wrap(&"W".repeat(40), font, 10.0, 100.0);
        assert!(lines.len() > 1 && lines.iter().all(|l| !l.is_empty()));
        assert_eq!(lines.concat(), "W".repeat(40));
        for line in &lines {
            assert!(Widths::get(font).measure(line, 10.0) <= 100.0, "{line}");
        }
        let lines = wrap(&"W".repeat(1000), font, 10.0, 100.0);
        assert_eq!(lines.len(), MAX_VALUE_LINES);
        assert!(lines[MAX_VALUE_LINES - 1].ends_with("..."));
        assert_eq!(wrap("", font, 10.0, 100.0), [""]);
    }

    #[test]
    fn a_no_break_space_glues_and_is_written_as_a_space() {
        let font = BuiltinFont::Helvetica;
        let glued = "aaaa bbbb\u{A0}cccc";
        assert_eq!(wrap(glued, font, 10.0, 60.0), ["aaaa", "bbbb cccc"]);
    }

    /// Every value as long as it can be (or, where the model sets no bound, cut at six
    /// lines): the body still ends above the footer.
    #[test]
    fn the_fullest_page_ends_above_its_footer() {
        use storage::{Currency, HistoryEntry, Money, OrderStatus, SaleId, Timestamp, UserId};
        let wide = |n: usize| "W".repeat(n);
        let money = Money {
            minor: i64::MIN,
            currency: Currency::parse("EUR").expect("code"),
        };
        let doc = Document {
            kind: Kind::RefundNote,
            seller: wide(1000),
            order_id: storage::OrderId::new(),
            sale_id: SaleId::parse(wide(64)).expect("sale id"),
            sku: wide(64),
            quantity: u32::MAX,
            unit_price: money,
            total: money,
            buyer: UserId::parse(wide(128)).expect("user id"),
            charge_id: wide(1000),
            paid_at: Some(Timestamp::MAX),
            closed: Some(HistoryEntry {
                status: OrderStatus::PaymentFailed,
                at: Timestamp::MIN,
            }),
        };
        let (ops, body_bottom) = page_ops(&doc);
        assert!(body_bottom > FOOTER_Y + 40.0, "{body_bottom}");
        for op in &ops {
            if let Op::SetTextCursor { pos } = op {
                assert!(
                    pos.x.0 >= MARGIN && pos.x.0 < PAGE_WIDTH - MARGIN,
                    "{pos:?}"
                );
                assert!(
                    pos.y.0 > MARGIN - 12.0 && pos.y.0 < PAGE_HEIGHT - MARGIN,
                    "{pos:?}"
                );
            }
        }
        // And the PDF of it is whole.
        let pdf = render(&doc);
        assert!(pdf.starts_with(b"%PDF-1.3"));
    }

    #[test]
    fn the_longest_ids_the_model_allows_fit_their_lines() {
        let w = "W".repeat(128);
        assert!(wrap(&w, BuiltinFont::Helvetica, BODY_SIZE, VALUE_WIDTH).len() <= 4);
        let sku = "W".repeat(64);
        assert!(wrap(&sku, BuiltinFont::Helvetica, BODY_SIZE, VALUE_WIDTH).len() <= 2);
    }
}
