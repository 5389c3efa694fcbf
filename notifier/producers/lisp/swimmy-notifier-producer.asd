;;;; The Lisp producer kit of swimmy-notifier: non-blocking notifications to the relay
;;;; over ZeroMQ (pzmq), and the relay's numbers for the Lisp side's own telemetry file.
;;;; `python -m notifier producer-kit lisp` prints the directory holding this file.

(asdf:defsystem "swimmy-notifier-producer"
  :description "Send notifications to the swimmy-notifier relay without ever blocking, and
merge its metrics into the Lisp side's system_metrics.sexp."
  :license "MIT"
  :depends-on ("pzmq" (:require "sb-posix"))
  :serial t
  :components ((:file "package")
               (:file "send")
               (:file "snapshot")
               (:file "python-view")
               (:file "telemetry")))
