//! The market-data feed: a random walk of quotes per symbol, with trades printed now and then.

use busway::{Codec, Message, Result, Topic};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::messages::{Quote, Trade};

/// Symbols the feed uses first; past these it makes up `SYM<n>`.
const TICKERS: [&str; 16] = [
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "JPM", "V", "XOM", "UNH", "JNJ", "WMT",
    "PG", "MA", "HD",
];

/// Chance that a symbol prints a trade on a tick.
const TRADE_CHANCE: f64 = 0.3;
/// Standard size of one tick's relative price move.
const TICK_MOVE: f64 = 0.001;

/// A simulated market-data source for `symbols` symbols.
#[derive(Debug)]
pub struct Feed {
    symbols: Vec<(String, f64)>,
    rng: StdRng,
}

impl Feed {
    /// A feed over `symbols` symbols, reproducible from `seed`.
    pub fn new(symbols: usize, seed: u64) -> Feed {
        let mut rng = StdRng::seed_from_u64(seed);
        let symbols = (0..symbols)
            .map(|i| {
                let sym = TICKERS
                    .get(i)
                    .map_or_else(|| format!("SYM{i}"), |t| t.to_string());
                (sym, rng.random_range(20.0..500.0))
            })
            .collect();
        Feed { symbols, rng }
    }

    /// The symbols, in order.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.symbols.iter().map(|(s, _)| s.as_str())
    }

    /// One tick: a quote per symbol on `marketdata.quotes.<SYM>`, and for some symbols a
    /// trade on `marketdata.trades.<SYM>`.
    ///
    /// # Errors
    /// Encoding errors (none for these types in practice).
    pub fn tick(&mut self, out: &mut Vec<Message>) -> Result<()> {
        for (sym, mid) in &mut self.symbols {
            // Sum of uniforms: a cheap bell-shaped move without a distributions crate.
            let shock: f64 = (0..4)
                .map(|_| self.rng.random_range(-1.0..1.0))
                .sum::<f64>()
                / 2.0;
            *mid = (*mid * (1.0 + TICK_MOVE * shock)).max(0.01);
            let half_spread = (*mid * 0.0001).max(0.005);
            let quote = Quote {
                sym: sym.clone(),
                bid: round_cents(*mid - half_spread),
                ask: round_cents(*mid + half_spread),
            };
            out.push(Message::encode(
                Topic::new(format!("marketdata.quotes.{sym}"))?,
                &quote,
                Codec::Json,
            )?);
            if self.rng.random_bool(TRADE_CHANCE) {
                let price = if self.rng.random_bool(0.5) {
                    quote.bid
                } else {
                    quote.ask
                };
                let trade = Trade {
                    sym: sym.clone(),
                    price,
                    size: self.rng.random_range(1..=500),
                };
                out.push(Message::encode(
                    Topic::new(format!("marketdata.trades.{sym}"))?,
                    &trade,
                    Codec::Json,
                )?);
            }
        }
        Ok(())
    }
}

fn round_cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_every_symbol_every_tick() {
        let mut feed = Feed::new(20, 7);
        assert_eq!(feed.symbols().nth(19), Some("SYM19"));
        let mut out = Vec::new();
        feed.tick(&mut out).unwrap();
        let quotes: Vec<&Message> = out
            .iter()
            .filter(|m| m.topic.as_str().starts_with("marketdata.quotes."))
            .collect();
        assert_eq!(quotes.len(), 20);
        let q: Quote = quotes[0].decode().unwrap();
        assert_eq!(q.sym, "AAPL");
        assert!(q.bid < q.ask);
    }
}
