;;;; Sending: one PUSH socket behind a mutex, every send non-blocking, every outcome
;;;; counted. A notification must never block or break the caller's trading loop.

(in-package #:swimmy-notifier-producer)

(defvar *notifier-zmq-drop-count* 0
  "Notifications dropped because ZeroMQ's queue for the relay was full (EAGAIN at the
high-water mark): the relay is down or far behind.")

(defvar *notifier-zmq-error-count* 0
  "Sends that failed with any other error; the socket was closed and the next call
connects a new one.")

(defparameter *notifier-sndhwm* 1000
  "How many notifications ZeroMQ holds for a relay that is down or slow; they arrive when
it is back (ZMQ_IMMEDIATE is not set). Beyond them, each one is dropped and counted.")

(defparameter *notifier-linger-ms* 500
  "How long CLOSE-NOTIFIER (and so the exit of the process) waits for queued
notifications to leave: bounded, so that a dead relay never holds up an exit.")

(defparameter *notifier-curve-server-key* nil
  "The relay's public key (Z85, 40 characters), or NIL for no CURVE.")
(defparameter *notifier-curve-public-key* nil
  "This producer's public key (Z85), with CURVE.")
(defparameter *notifier-curve-secret-key* nil
  "This producer's secret key (Z85), with CURVE. Keep it out of the source: read it at
start from a file only this user can read.")

(defvar *lock* (sb-thread:make-mutex :name "swimmy-notifier-producer")
  "Guards everything below: a ZeroMQ socket must not be used by two threads at once.")
(defvar *context* nil)
(defvar *socket* nil)
(defvar *socket-endpoint* nil "The ENDPOINT argument *SOCKET* was opened for (NIL: the default).")
(defvar *dropping* nil "True from a drop until the next notification is queued.")

(defun default-endpoint ()
  "tcp://$SWIMMY_ZMQ_HOST:$SWIMMY_PORT_NOTIFIER, as the Lisp core and the guardian build it."
  (flet ((env (name default)
           (let ((value (sb-ext:posix-getenv name)))
             (if (and value (string/= value "")) value default))))
    (format nil "tcp://~a:~a" (env "SWIMMY_ZMQ_HOST" "127.0.0.1")
            (env "SWIMMY_PORT_NOTIFIER" "5562"))))

(defun escaped-length (text)
  "TEXT's length once \" and \\ are escaped (compiled apart for SBCL's usual strings)."
  (flet ((escapes (text)
           (count-if (lambda (char) (or (char= char #\") (char= char #\\))) text)))
    (+ (length text) (typecase text
                       ((simple-array character (*)) (escapes text))
                       (t (escapes text))))))

(defun put-text (text envelope start escape)
  "Copy TEXT into ENVELOPE from START, with \" and \\ escaped when ESCAPE; the new end.
Compiled apart for the strings SBCL makes, (simple-array character (*)), which keeps an
envelope a fraction of a microsecond."
  (declare (type (simple-array character (*)) envelope) (type fixnum start))
  (macrolet ((copy ()
               `(loop for char across text
                      do (when (and escape (or (char= char #\") (char= char #\\)))
                           (setf (schar envelope start) #\\)
                           (incf start))
                         (setf (schar envelope start) char)
                         (incf start))))
    (typecase text
      ((simple-array character (*)) (copy))
      (t (copy))))
  start)

(defun notifier-envelope (webhook payload-json)
  "The canonical envelope, exactly as the Lisp core prints it with ~S and *PRINT-CASE*
:DOWNCASE: ((type . \"NOTIFIER\") (schema_version . 1) (action . \"SEND\") (webhook . W)
(payload_json . P)), strings between double quotes with only \" and \\ escaped. Written
directly, in one allocation, so that no printer setting of the caller (*PRINT-PRETTY*,
*PRINT-READABLY*...) can change it."
  (check-type webhook string)
  (check-type payload-json string)
  (let* ((head "((type . \"NOTIFIER\") (schema_version . 1) (action . \"SEND\") (webhook . \"")
         (middle "\") (payload_json . \"")
         (tail "\"))")
         (envelope (make-string (+ (length head) (escaped-length webhook) (length middle)
                                   (escaped-length payload-json) (length tail)))))
    (put-text tail envelope
              (put-text payload-json envelope
                        (put-text middle envelope
                                  (put-text webhook envelope (put-text head envelope 0 nil) t)
                                  nil)
                        t)
              nil)
    envelope))

(defun open-socket (endpoint)
  "A PUSH socket connected (in the background: connecting does not wait for the relay)
to ENDPOINT or the default one. Any failure closes it at once and signals."
  (unless *context*
    (let ((context (pzmq:ctx-new)))
      (when (cffi:null-pointer-p context)
        (error "zmq_ctx_new failed: ~a" (pzmq:strerror)))
      (setf *context* context)))
  (let ((socket (pzmq:socket *context* :push)))
    (handler-bind ((error (lambda (condition)
                            (declare (ignore condition))
                            (ignore-errors (pzmq:setsockopt socket :linger 0))
                            (ignore-errors (pzmq:close socket)))))
      (pzmq:setsockopt socket :sndhwm *notifier-sndhwm*)
      (pzmq:setsockopt socket :linger *notifier-linger-ms*)
      (let ((keys (list *notifier-curve-server-key* *notifier-curve-public-key*
                        *notifier-curve-secret-key*)))
        (cond ((every #'null keys))
              ((notevery #'stringp keys)
               (error "CURVE needs all three of *notifier-curve-server-key*, ~
                       *notifier-curve-public-key* and *notifier-curve-secret-key*"))
              (t (pzmq:setsockopt socket :curve-serverkey (first keys))
                 (pzmq:setsockopt socket :curve-publickey (second keys))
                 (pzmq:setsockopt socket :curve-secretkey (third keys)))))
      (pzmq:connect socket (or endpoint (default-endpoint))))
    socket))

(defun forget-socket (linger)
  "Close the socket (queued notifications get LINGER ms) and forget it."
  (when *socket*
    (ignore-errors (pzmq:setsockopt *socket* :linger linger))
    (ignore-errors (pzmq:close *socket*))
    (setf *socket* nil *socket-endpoint* nil)))

(defun notifier-send (webhook payload-json &key endpoint)
  "Hand one notification to the relay; T when ZeroMQ took it, NIL when it was dropped
(EAGAIN: the high-water mark is full, *NOTIFIER-ZMQ-DROP-COUNT* + 1) or failed (any other
error, *NOTIFIER-ZMQ-ERROR-COUNT* + 1; after a ZeroMQ error the socket is closed with
linger 0, so that the next call reconnects). It never blocks (pzmq:send with :dontwait t)
and never signals, except
a TYPE-ERROR at once when WEBHOOK or PAYLOAD-JSON is not a string: the caller's bug.
ENDPOINT defaults to tcp://$SWIMMY_ZMQ_HOST:$SWIMMY_PORT_NOTIFIER (127.0.0.1:5562).
Safe from any number of threads."
  (let ((message (notifier-envelope webhook payload-json))
        (note nil))
    (multiple-value-prog1
        (sb-thread:with-mutex (*lock*)
          (handler-case
              (progn
                (unless (and *socket* (equal endpoint *socket-endpoint*))
                  (forget-socket *notifier-linger-ms*) ; another endpoint: let the old queue leave
                  (setf *socket* (open-socket endpoint)
                        *socket-endpoint* endpoint))
                (pzmq:send *socket* message :dontwait t :encoding :utf-8)
                (when *dropping*
                  (setf *dropping* nil
                        note (format nil "the relay takes notifications again (~d dropped in all)"
                                     *notifier-zmq-drop-count*)))
                t)
            (pzmq:eagain ()
              (incf *notifier-zmq-drop-count*)
              (unless *dropping*
                (setf *dropping* t
                      note (format nil "the relay is not taking notifications (high-water ~
                                        mark of ~d reached): dropping them" *notifier-sndhwm*)))
              nil)
            (pzmq:libzmq-error (condition)
              (incf *notifier-zmq-error-count*)
              (forget-socket 0)
              (setf note (format nil "sending failed (~a); reconnecting on the next call"
                                 (one-line (princ-to-string condition))))
              nil)
            (error (condition) ; not the socket's fault (a setting, an unencodable string)
              (incf *notifier-zmq-error-count*)
              (setf note (format nil "sending failed (~a)" (one-line (princ-to-string condition))))
              nil)))
      (when note ; outside the lock: the output stream may block
        (ignore-errors
         (format *error-output* "~&swimmy-notifier-producer: ~a~%" note)
         (finish-output *error-output*))))))

(defun one-line (text)
  "TEXT with each run of whitespace made one space."
  (with-output-to-string (out)
    (let ((space nil))
      (loop for char across (string-trim '(#\Space #\Tab #\Newline #\Return) text)
            do (if (member char '(#\Space #\Tab #\Newline #\Return #\Page))
                   (setf space t)
                   (progn (when space (write-char #\Space out) (setf space nil))
                          (write-char char out)))))))

(defun close-notifier ()
  "Close the socket and the context: queued notifications get *NOTIFIER-LINGER-MS* to
reach the relay. The next NOTIFIER-SEND opens new ones. Returns T."
  (let ((context nil))
    (sb-thread:with-mutex (*lock*)
      (forget-socket *notifier-linger-ms*)
      (shiftf context *context* nil)
      (setf *dropping* nil))
    (when context ; outside the lock: terminating waits up to the linger
      (ignore-errors (pzmq:ctx-term context))))
  t)
