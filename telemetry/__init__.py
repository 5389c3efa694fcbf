"""Merge the notifier relay metrics into the Lisp side system_metrics.sexp."""
