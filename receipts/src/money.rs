//! Amounts as a receipt writes them: the currency code, then the amount in major units with
//! as many decimals as ISO 4217 gives the currency (`EUR 12.50`, `JPY 1250`, `BHD 1.250`).

use storage::{Currency, Money};

/// How many decimals the minor unit of `currency` has (the ISO 4217 "minor unit" column):
/// 0 for currencies without a minor unit in use (JPY, KRW, ISK, CLP, VND, ...), 3 for the
/// dinars and rials that count in thousandths (BHD, KWD, OMR, ...), 4 for the two units of
/// account that count in ten-thousandths (CLF, UYW) and 2 for every other code, including
/// codes ISO 4217 does not list or gives no minor unit (XAU, XXX).
pub fn minor_unit_exponent(currency: Currency) -> u32 {
    match currency.as_str() {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "UYI" | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        "CLF" | "UYW" => 4,
        _ => 2,
    }
}

/// `money` as `CODE amount`, the amount in major units with the currency's decimals
/// ([`minor_unit_exponent`]): `EUR 12.50`, `JPY 1250`, `BHD 1.250`, `EUR -0.05`. Never
/// panics, `i64::MIN` included.
pub fn format_money(money: Money) -> String {
    let exponent = minor_unit_exponent(money.currency);
    let sign = if money.minor < 0 { "-" } else { "" };
    let magnitude = money.minor.unsigned_abs();
    let code = money.currency;
    if exponent == 0 {
        return format!("{code} {sign}{magnitude}");
    }
    let scale = 10u64.pow(exponent);
    let width = exponent as usize;
    format!(
        "{code} {sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(minor: i64, code: &str) -> Money {
        Money {
            minor,
            currency: Currency::parse(code).expect("valid code"),
        }
    }

    #[test]
    fn amounts_have_the_currencys_decimals() {
        assert_eq!(format_money(money(1250, "EUR")), "EUR 12.50");
        assert_eq!(format_money(money(5, "EUR")), "EUR 0.05");
        assert_eq!(format_money(money(0, "USD")), "USD 0.00");
        assert_eq!(format_money(money(1250, "JPY")), "JPY 1250");
        assert_eq!(format_money(money(1250, "KRW")), "KRW 1250");
        assert_eq!(format_money(money(1250, "BHD")), "BHD 1.250");
        assert_eq!(format_money(money(7, "KWD")), "KWD 0.007");
        assert_eq!(format_money(money(12345, "CLF")), "CLF 1.2345");
    }

    #[test]
    fn an_unknown_currency_has_two_decimals() {
        assert_eq!(
            minor_unit_exponent(Currency::parse("QQQ").expect("code")),
            2
        );
        assert_eq!(format_money(money(1250, "QQQ")), "QQQ 12.50");
        assert_eq!(format_money(money(1, "XXX")), "XXX 0.01");
    }

    #[test]
    fn negative_and_extreme_amounts_do_not_panic() {
        assert_eq!(format_money(money(-5, "EUR")), "EUR -0.05");
        assert_eq!(format_money(money(-1250, "JPY")), "JPY -1250");
        assert_eq!(
            format_money(money(i64::MIN, "EUR")),
            "EUR -92233720368547758.08"
        );
        assert_eq!(
            format_money(money(i64::MAX, "BHD")),
            "BHD 9223372036854775.807"
        );
    }
}
