"""The engine: dynamic batchers, single-flight over missed inputs, and the model worker pools behind them."""
