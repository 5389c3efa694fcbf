;;;; Drives the Lisp producer kit for tests/test_producer_kits.py and
;;;; scripts/bench_producer_kits.py. Loads pzmq ($PZMQ_DIR) and the kit ($KIT_DIR), compiled
;;;; into $KIT_ASDF_CACHE, then reads one form at a time from standard input, evaluates it
;;;; in the package KIT-DRIVER (which uses the kit) and prints "#answer <octets>\n<text>",
;;;; the text being (ok . VALUE) or (error . "MESSAGE"), printed with *PRINT-CASE*
;;;; :DOWNCASE. (The first load runs the C compiler, whose output may precede an answer.)

(require :asdf)
(setf asdf:*user-cache* (uiop:ensure-directory-pathname (uiop:getenv "KIT_ASDF_CACHE")))
(asdf:clear-configuration)
(dolist (variable '("PZMQ_DIR" "KIT_DIR"))
  (push (uiop:ensure-directory-pathname (uiop:getenv variable)) asdf:*central-registry*))
(let ((*standard-output* *error-output*)) ; compiler notes must not reach the answers
  (asdf:load-system "swimmy-notifier-producer"))

(defpackage #:kit-driver
  (:use #:cl #:swimmy-notifier-producer))
(in-package #:kit-driver)

(defun captured-send-arguments (webhook payload-json endpoint)
  "The plan's Step 1: the arguments NOTIFIER-SEND passes to pzmq:send (the socket left
out), and what it returned."
  (let ((calls '()))
    (sb-int:encapsulate 'pzmq:send 'capture
                        (lambda (send &rest arguments)
                          (push (rest arguments) calls)
                          (apply send arguments)))
    (unwind-protect
         (let ((result (notifier-send webhook payload-json :endpoint endpoint)))
           (list result (reverse calls)))
      (sb-int:unencapsulate 'pzmq:send 'capture))))

(defun send-all (webhook payloads endpoint)
  "Send each payload; (queued dropped failed drop-count error-count)."
  (let ((outcomes (mapcar (lambda (payload) (notifier-send webhook payload :endpoint endpoint))
                          payloads)))
    (list (count t outcomes) (count nil outcomes) 0
          *notifier-zmq-drop-count* *notifier-zmq-error-count*)))

(defun send-numbered (webhook count endpoint)
  "Send COUNT notifications {\"content\":\"nI\"}; as SEND-ALL."
  (send-all webhook (loop for i below count collect (format nil "{\"content\":\"n~d\"}" i))
            endpoint))

(defun send-from-threads (webhook payload-lists endpoint)
  "One thread per list of payloads, all sending at once; how many were queued."
  (let* ((start (sb-thread:make-semaphore))
         (threads (loop for payloads in payload-lists
                        collect (let ((payloads payloads))
                                  (sb-thread:make-thread
                                   (lambda ()
                                     (sb-thread:wait-on-semaphore start)
                                     (count t (mapcar (lambda (payload)
                                                        (notifier-send webhook payload
                                                                       :endpoint endpoint))
                                                      payloads))))))))
    (sb-thread:signal-semaphore start (length threads))
    (reduce #'+ (mapcar #'sb-thread:join-thread threads))))

(defun nanoseconds ()
  (multiple-value-bind (seconds nanos) (sb-unix::clock-gettime 1) ; CLOCK_MONOTONIC
    (+ (* seconds 1000000000) nanos)))

(defun percentiles (nanos)
  "(p50 p99 max) of NANOS in microseconds."
  (let* ((sorted (sort (coerce nanos 'vector) #'<))
         (at (lambda (q) (/ (aref sorted (round (* q (1- (length sorted))))) 1000.0d0))))
    (list (funcall at 0.5) (funcall at 0.99) (funcall at 1))))

(defun bench (count webhook payload-json endpoint &key bare)
  "Time COUNT calls of NOTIFIER-SEND, or with BARE of a plain pzmq:send :dontwait t of the
same envelope on a socket with the same options: (p50 p99 max) in microseconds."
  (let ((nanos (make-array count))
        (envelope (notifier-envelope webhook payload-json)))
    (if bare
        (pzmq:with-context (context)
          (pzmq:with-socket (socket context) (:push :sndhwm *notifier-sndhwm*
                                                    :linger *notifier-linger-ms*)
            (pzmq:connect socket endpoint)
            (dotimes (i count)
              (let ((started (nanoseconds)))
                (handler-case (pzmq:send socket envelope :dontwait t :encoding :utf-8)
                  (pzmq:eagain () nil))
                (setf (aref nanos i) (- (nanoseconds) started))))))
        (dotimes (i count)
          (let ((started (nanoseconds)))
            (notifier-send webhook payload-json :endpoint endpoint)
            (setf (aref nanos i) (- (nanoseconds) started)))))
    (percentiles nanos)))

(defun answer (text out)
  "TEXT after its length in UTF-8 octets, on a line of its own."
  (format out "~&#answer ~d~%~a" (length (sb-ext:string-to-octets text :external-format :utf-8))
          text)
  (finish-output out))

(let ((in (sb-sys:make-fd-stream 0 :input t :external-format :utf-8 :buffering :full))
      (out (sb-sys:make-fd-stream 1 :output t :external-format :utf-8 :buffering :full)))
  (loop
    (let ((form (let ((*package* (find-package '#:kit-driver)))
                  (read in nil in))))
      (when (eq form in)
        (close-notifier)
        (sb-ext:exit :code 0))
      (answer (let ((*package* (find-package '#:kit-driver))
                    (*print-case* :downcase)
                    (*print-pretty* nil)
                    (*print-readably* nil))
                (handler-case (prin1-to-string (cons 'ok (eval form)))
                  (error (condition)
                    (prin1-to-string (cons 'error (princ-to-string condition))))))
              out))))
