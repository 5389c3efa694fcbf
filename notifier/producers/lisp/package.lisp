(defpackage #:swimmy-notifier-producer
  (:use #:cl)
  (:documentation "Hand notifications to the swimmy-notifier relay without ever blocking
the caller (NOTIFIER-SEND), and report the relay's metrics the way `python -m telemetry
merge` does (NOTIFIER-TELEMETRY-ENTRIES).")
  (:export #:*notifier-zmq-drop-count*
           #:*notifier-zmq-error-count*
           #:*notifier-sndhwm*
           #:*notifier-linger-ms*
           #:*notifier-curve-server-key*
           #:*notifier-curve-public-key*
           #:*notifier-curve-secret-key*
           #:notifier-envelope
           #:notifier-send
           #:close-notifier
           #:notifier-telemetry-entries))
