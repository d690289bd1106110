//! The payloads the demo's feed and engines exchange, all JSON.

use serde::{Deserialize, Serialize};

/// `marketdata.quotes.<SYM>`: the best bid and ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    /// The symbol.
    pub sym: String,
    /// Best bid.
    pub bid: f64,
    /// Best ask.
    pub ask: f64,
}

/// `marketdata.trades.<SYM>`: a print on the tape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trade {
    /// The symbol.
    pub sym: String,
    /// Trade price.
    pub price: f64,
    /// Shares traded.
    pub size: u32,
}

/// `engine.features.<SYM>`: rolling statistics of the mid price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Features {
    /// The symbol.
    pub sym: String,
    /// The latest mid price.
    pub mid: f64,
    /// Mean of the mids in the window.
    pub mean: f64,
    /// Standard deviation of the mids in the window.
    pub std: f64,
    /// The latest log return.
    pub ret: f64,
    /// Standard deviation of the log returns in the window.
    pub vol: f64,
    /// Mids in the window.
    pub n: usize,
}

/// `engine.factor.<SYM>`: a mean-reversion score (positive: price below its mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorScore {
    /// The symbol.
    pub sym: String,
    /// The score, clamped to [-4, 4].
    pub score: f64,
}

/// `engine.ml.<SYM>`: the model's probability that the next move is up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MlScore {
    /// The symbol.
    pub sym: String,
    /// Probability of an up move, in (0, 1).
    pub p_up: f64,
}

/// Which way an order goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Buy.
    Buy,
    /// Sell.
    Sell,
}

/// `engine.orders.<SYM>`: an order from the strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    /// Unique per strategy run.
    pub id: u64,
    /// The symbol.
    pub sym: String,
    /// Buy or sell.
    pub side: Side,
    /// Shares.
    pub qty: u32,
    /// The signal that triggered it.
    pub signal: f64,
}

/// `engine.positions.<SYM>`: a position marked at the last trade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// The symbol.
    pub sym: String,
    /// Signed shares held.
    pub qty: i64,
    /// Average cost of the open shares.
    pub avg_px: f64,
    /// The last trade price.
    pub last_px: f64,
    /// Profit locked in by closing trades.
    pub realized: f64,
    /// Profit of the open shares at `last_px`.
    pub unrealized: f64,
}

/// `engine.margin`: the account's margin from all positions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Margin {
    /// Sum of |position value|.
    pub gross: f64,
    /// Sum of signed position value.
    pub net: f64,
    /// Margin required.
    pub required: f64,
    /// Realized plus unrealized profit.
    pub pnl: f64,
    /// Symbols with a position report.
    pub symbols: usize,
}
