;;;; The notifier_* entries of system_metrics.sexp, computed by the Lisp side itself with
;;;; exactly the rules of `python -m telemetry merge` (telemetry/merge.py): the same keys,
;;;; values, statuses and reasons. The Lisp side's telemetry writer appends them to each
;;;; write, so they no longer vanish between two cron merges.

(in-package #:swimmy-notifier-producer)

(defconstant +universal-to-unix+ 2208988800 "Universal time minus Unix time.")
(defconstant +future-tolerance-sec+ 300
  "A snapshot dated further ahead is refused: a wrong unit, not clock drift.")
(defconstant +max-reason-chars+ 300)

(defparameter *counters*
  '("queue_len" "queue_max" "drops" "errors" "delivered" "failed" "rejected"
    "deduplicated" "pending" "received" "lost")
  "Every counter merged, as notifier_<name>; one the snapshot lacks is NIL.")

(defparameter *required-counters* '("queue_len" "drops" "errors")
  "The counters the plan defines: with schema_version and timestamp, all a snapshot needs.")

(defun default-metrics-file ()
  "$SWIMMY_NOTIFIER_METRICS_FILE, else $SWIMMY_HOME/data/notifier_metrics.sexp, $SWIMMY_HOME
defaulting to the current directory: where the relay writes it."
  (flet ((env (name)
           (let ((value (sb-ext:posix-getenv name)))
             (and value (string/= value "") value))))
    (or (env "SWIMMY_NOTIFIER_METRICS_FILE")
        (let ((home (or (env "SWIMMY_HOME") (sb-posix:getcwd))))
          (format nil "~a/data/notifier_metrics.sexp"
                  (if (every (lambda (c) (char= c #\/)) home) "" (string-right-trim "/" home)))))))

(defun capped (reason)
  (if (<= (length reason) +max-reason-chars+)
      reason
      (concatenate 'string (subseq reason 0 (1- +max-reason-chars+)) "…")))

(defun count-p (value)
  (and (integerp value) (>= value 0)))

(defun fixed-0 (x)
  "Python's format(X, '.0f'): X rounded half to even, as an integer."
  (format nil "~d" (round (rational x))))

(defun general-format (x)
  "Python's format(X, 'g'): 6 significant digits, trailing zeros dropped, exponent form
below 1e-4 and from 1e6."
  (let ((a (abs (rational x))))
    (if (zerop a)
        "0"
        (let ((e 0))
          (loop while (>= a (expt 10 (1+ e))) do (incf e))
          (loop while (< a (expt 10 e)) do (decf e))
          (let ((digits (round (/ a (expt 10 (- e 5))))))
            (when (>= digits 1000000) (setf digits (/ digits 10)) (incf e))
            (let* ((text (string-right-trim "0" (format nil "~d" digits)))
                   (text (if (string= text "") "0" text))
                   (sign (if (minusp x) "-" "")))
              (cond ((<= -4 e 5)
                     (let ((shifted (if (minusp e)
                                        (format nil "0.~a~a" (make-string (- -1 e) :initial-element #\0) text)
                                        (if (< e (1- (length text)))
                                            (format nil "~a.~a" (subseq text 0 (1+ e)) (subseq text (1+ e)))
                                            (format nil "~a~a" text (make-string (- e (1- (length text)))
                                                                                 :initial-element #\0))))))
                       (concatenate 'string sign shifted)))
                    (t (format nil "~a~a~:[.~a~;~*~]e~:[+~;-~]~2,'0d" sign (char text 0)
                               (= (length text) 1) (subseq text 1) (minusp e) (abs e))))))))))

(defun usable-snapshot (path name now-unix)
  "The values to merge from the snapshot at PATH, as an alist of (\"notifier_<name>\" .
value), or UNUSABLE-SNAPSHOT: telemetry/merge.py's read_notifier."
  (let ((snapshot (read-snapshot path name)))
    (unless (alist-p snapshot)
      (unusable "invalid" "~a is not an alist of (key . value) entries" name))
    (let ((version (lookup snapshot "schema_version")))
      (unless (eql version 1)
        (unusable "unsupported_schema" "~a has ~:[schema_version ~a~;no schema_version~*~]; only 1 is known"
                  name (null version) (python-quote version))))
    (let ((bad (loop for counter in *counters*
                     for value = (lookup snapshot counter)
                     unless (or (count-p value)
                                (and (null value) (not (member counter *required-counters*
                                                               :test #'string=))))
                       collect counter)))
      (when bad
        (unusable "invalid" "~a: ~{~a~^, ~} missing or not a whole number >= 0" name bad)))
    (let ((timestamp (lookup snapshot "timestamp")))
      (unless (and (realp timestamp) (not (typep timestamp 'ratio)) (>= timestamp 0))
        (unusable "invalid" "~a: timestamp ~a is not Unix time" name (python-quote timestamp)))
      (when (> timestamp (+ now-unix +future-tolerance-sec+))
        (unusable "invalid" "~a: timestamp ~a is ~a s in the future; it must be Unix time"
                  name (fixed-0 timestamp) (fixed-0 (- (rational timestamp) now-unix))))
      (append (loop for counter in *counters*
                    collect (cons (concatenate 'string "notifier_" counter)
                                  (lookup snapshot counter)))
              (list (cons "notifier_snapshot_unix" (floor timestamp)))))))

(defun merge-entries (path name now stale-after)
  "(\"notifier_...\" . value) entries as the merge writes them into a file that has none."
  (let ((now-unix (- now +universal-to-unix+)))
    (handler-case
        (let* ((values (usable-snapshot path name now-unix))
               (age (max 0 (floor (- now-unix (cdr (assoc "notifier_snapshot_unix" values
                                                          :test #'string=))))))
               (stale (> age stale-after)))
          (list* (cons "notifier_status" (if stale "stale" "ok"))
                 (cons "notifier_status_reason"
                       (and stale (capped (format nil "snapshot is ~d s old (stale after ~a s): ~
                                                       the relay is not writing ~a"
                                                  age (general-format stale-after) name))))
                 (cons "notifier_age_sec" age)
                 values))
      (unusable-snapshot (problem)
        (list (cons "notifier_status" (unusable-status problem))
              (cons "notifier_status_reason" (capped (unusable-reason problem)))
              (cons "notifier_age_sec" nil))))))

(defun notifier-telemetry-entries (&key metrics-file (now (get-universal-time)) (stale-after 60))
  "A fresh alist of the notifier_* entries exactly as `python -m telemetry merge` writes
them for the relay's snapshot METRICS-FILE (default: where the relay writes it) at
universal time NOW: notifier_status (\"ok\", \"stale\", \"missing\", \"unreadable\",
\"invalid\" or \"unsupported_schema\"), notifier_status_reason, notifier_age_sec and, from
a usable snapshot, the counters and notifier_snapshot_unix; then notifier_zmq_drops and
notifier_zmq_errors, this process's own counters. Keys are interned in the current
package, so that they print like the caller's other keys. Never signals."
  (let* ((path (or metrics-file (ignore-errors (default-metrics-file)) "data/notifier_metrics.sexp"))
         (name (if (pathnamep path) (sb-ext:native-namestring path) path))
         (entries (handler-case (merge-entries name name now stale-after)
                    (serious-condition (condition)
                      (list (cons "notifier_status" "unreadable")
                            (cons "notifier_status_reason"
                                  (capped (format nil "~a: cannot be read (~a)" name
                                                  (ignore-errors (one-line (princ-to-string condition))))))
                            (cons "notifier_age_sec" nil))))))
    (loop for (key . value) in (append entries
                                       (list (cons "notifier_zmq_drops" *notifier-zmq-drop-count*)
                                             (cons "notifier_zmq_errors" *notifier-zmq-error-count*)))
          collect (cons (key-symbol key)
                        (if (stringp value) (coerce value '(simple-array character (*))) value)))))

(defun key-symbol (key)
  "KEY interned in the current package, or in this one if that one refuses (locked)."
  (let ((name (string-upcase key)))
    (handler-case (intern name *package*)
      (error () (intern name '#:swimmy-notifier-producer)))))
