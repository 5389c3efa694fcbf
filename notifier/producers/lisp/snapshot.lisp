;;;; Reading the relay's snapshot (data/notifier_metrics.sexp) safely: a regular file of
;;;; at most 1 MiB, strict UTF-8, and SBCL's own reader under WITH-STANDARD-IO-SYNTAX with
;;;; *READ-EVAL* off and a readtable that refuses every form that is not data. What it
;;;; refuses, and where, is worded as `python -m telemetry merge` words it, so that both
;;;; report the same reason for the same file.

(in-package #:swimmy-notifier-producer)

(defconstant +max-bytes+ (* 1024 1024) "Largest snapshot read, as the merge's reader.")
(defconstant +max-depth+ 64 "Deepest list nesting read, as the merge's reader.")

(define-condition unusable-snapshot (error)
  ((status :initarg :status :reader unusable-status)
   (reason :initarg :reason :reader unusable-reason))
  (:documentation "The snapshot cannot be used: STATUS as the merge names it, and why."))

(defun unusable (status control &rest arguments)
  (error 'unusable-snapshot :status status :reason (apply #'format nil control arguments)))

(defstruct (lisp-false (:constructor make-lisp-false ()))
  "#f: false, which Lisp cannot tell from NIL but the merge's reader can.")
(defvar +false+ (make-lisp-false))

(defstruct (keyword-token (:constructor make-keyword-token (name)))
  "A keyword as read here: never interned, so that a hostile file cannot fill the
KEYWORD package."
  (name "" :type string))

;;; The file

(defun read-regular-octets (path name limit)
  "At most LIMIT + 1 octets of the file PATH (shown as NAME), refusing anything but a
regular file: opened non-blocking, so that even a FIFO cannot hang the caller."
  (let ((fd (handler-case (sb-posix:open path (logior sb-posix:o-rdonly sb-posix:o-nonblock))
              (sb-posix:syscall-error (condition)
                (let ((errno (sb-posix:syscall-errno condition)))
                  (if (= errno sb-posix:enoent)
                      (unusable "missing" "~a does not exist (is the relay running?)" name)
                      (unusable "unreadable" "cannot read ~a: ~a" name
                                (sb-int:strerror errno))))))))
    (let ((stream (sb-sys:make-fd-stream fd :input t :element-type '(unsigned-byte 8)
                                            :buffering :full)))
      (unwind-protect
           (let ((kind (logand (sb-posix:stat-mode (sb-posix:fstat fd)) sb-posix:s-ifmt)))
             (unless (= kind sb-posix:s-ifreg)
               (unusable "unreadable" "cannot read ~a: ~a" name
                         (if (= kind sb-posix:s-ifdir) "is a directory" "not a regular file")))
             (handler-case (read-upto stream (1+ limit))
               (stream-error (condition)
                 (unusable "unreadable" "cannot read ~a: ~a" name
                           (one-line (princ-to-string condition))))))
        (close stream)))))

(defun read-upto (stream count)
  "The octets of STREAM up to its end or COUNT, whichever comes first."
  (let ((chunks '()) (total 0))
    (loop for want = (min 65536 (- count total))
          while (plusp want)
          do (let* ((chunk (make-array want :element-type '(unsigned-byte 8)))
                    (got (read-sequence chunk stream)))
               (when (zerop got) (loop-finish))
               (push (subseq chunk 0 got) chunks)
               (incf total got)))
    (apply #'concatenate '(simple-array (unsigned-byte 8) (*)) (nreverse chunks))))

(defun invalid-utf-8 (octets)
  "The index of the first octet that does not start a valid UTF-8 sequence (overlong
forms, surrogates and code points past U+10FFFF included), or NIL."
  (let ((length (length octets)) (i 0))
    (flet ((continuation-p (index low high)
             (and (< index length) (<= low (aref octets index) high))))
      (loop while (< i length)
            do (let ((lead (aref octets i)))
                 (multiple-value-bind (size low high)
                     (cond ((< lead #x80) (values 1 0 0))
                           ((<= #xC2 lead #xDF) (values 2 #x80 #xBF))
                           ((= lead #xE0) (values 3 #xA0 #xBF))
                           ((= lead #xED) (values 3 #x80 #x9F))
                           ((<= #xE1 lead #xEF) (values 3 #x80 #xBF))
                           ((= lead #xF0) (values 4 #x90 #xBF))
                           ((<= #xF1 lead #xF3) (values 4 #x80 #xBF))
                           ((= lead #xF4) (values 4 #x80 #x8F))
                           (t (return-from invalid-utf-8 i)))
                   (unless (or (= size 1)
                               (and (continuation-p (1+ i) low high)
                                    (loop for k from (+ i 2) below (+ i size)
                                          always (continuation-p k #x80 #xBF))))
                     (return-from invalid-utf-8 i))
                   (incf i size)))))
    nil))

(defun position-text (sequence offset newline)
  "\" at line L, column C\" for OFFSET, counting lines by NEWLINE items before it."
  (let ((last (position newline sequence :end offset :from-end t)))
    (format nil " at line ~d, column ~d" (1+ (count newline sequence :end offset))
            (- offset (or last -1)))))

(defun decode-snapshot (octets)
  "OCTETS as text, or an explanation of why not, as the merge's reader gives it."
  (when (> (length octets) +max-bytes+)
    (return-from decode-snapshot
      (values nil (format nil "input of ~d bytes is over the ~d limit" (length octets)
                          +max-bytes+))))
  (let ((bad (invalid-utf-8 octets)))
    (when bad
      (return-from decode-snapshot
        (values nil (format nil "invalid UTF-8 (byte 0x~(~2,'0x~))~a" (aref octets bad)
                            (position-text octets bad 10))))))
  (let ((text (sb-ext:octets-to-string octets :external-format :utf-8)))
    (if (and (plusp (length text)) (char= (char text 0) (code-char #xFEFF)))
        (subseq text 1)
        text)))

;;; The reader

(define-condition syntax-problem (error)
  ((message :initarg :message :reader problem-message)
   (offset :initarg :offset :reader problem-offset))
  (:documentation "Text that is not data, and the character offset where it shows."))

(defun refuse (offset control &rest arguments)
  (error 'syntax-problem :message (apply #'format nil control arguments) :offset offset))

(defvar *depth* 0 "Lists open around the reader now.")
(defvar *open* nil "(kind . offset) of each list and string being read, innermost first.")
(defvar *standard-readtable* (copy-readtable nil))

(defun standard-macro (char)
  (get-macro-character char *standard-readtable*))

(defun start-of (stream)
  "Where the character the reader just took started."
  (1- (file-position stream)))

(defun read-list* (stream char)
  (let ((start (start-of stream))
        (*depth* (1+ *depth*)))
    (when (> *depth* +max-depth+)
      (refuse start "nesting deeper than ~d" +max-depth+))
    (let ((*open* (acons :list start *open*)))
      (funcall (standard-macro #\() stream char))))

(defun read-close* (stream char)
  (if (zerop *depth*)
      (refuse (start-of stream) "unbalanced ')'")
      (funcall (standard-macro #\)) stream char)))

(defun read-string* (stream char)
  (let ((*open* (acons :string (start-of stream) *open*)))
    (funcall (standard-macro #\") stream char)))

(defun refuse-quote (stream char)
  (refuse (start-of stream) "quote and backquote forms (~a) are not data"
          (python-string-repr (string char))))

(defun read-keyword* (stream char)
  "A keyword, as data: its name, never interned."
  (declare (ignore char))
  (let ((name (read stream t nil t)))
    (make-keyword-token (if (symbolp name) (symbol-name name) (princ-to-string name)))))

(defun token-end-p (char)
  (or (null char) (find char '(#\Space #\Tab #\Newline #\Return #\Page #.(code-char 11)
                               #\( #\) #\" #\;))))

(defun read-hash* (stream char)
  "The # forms that are data (#t, #f, base strings #A((n) base-char . \"...\")); every
other one, #. above all, is refused."
  (declare (ignore char))
  (let ((start (start-of stream))
        (next (read-char stream nil nil)))
    (case next
      ((nil) (refuse start "'#' at the end of the input"))
      (#\. (refuse start "read-time evaluation (#.) is refused"))
      ((#\t #\T #\f #\F)
       (unless (token-end-p (peek-char nil stream nil nil))
         (refuse start "unsupported '#~a' form" next))
       (if (char-equal next #\t) t +false+))
      ((#\a #\A)
       (unless (eql (peek-char nil stream nil nil) #\()
         (refuse start "unsupported '#~a' form" next))
       (let* ((open (file-position stream))
              (form (read stream t nil t)))
         (or (base-string-of form)
             (refuse open "unsupported #A array (only base strings are data here)"))))
      (t (refuse start "unsupported '#~a' form" next)))))

(defun base-string-of (form)
  "The string of ((n) base-char . \"...\"), SBCL's readable base string, or NIL."
  (when (and (consp form) (consp (cdr form)) (stringp (cddr form)))
    (destructuring-bind (dimensions element-type . string) form
      (and (consp dimensions) (null (cdr dimensions))
           (eql (car dimensions) (length string))
           (symbol-like-p element-type)
           (member (symbol-name* element-type) '("BASE-CHAR" "CHARACTER") :test #'string=)
           string))))

(defvar *snapshot-readtable*
  (let ((readtable (copy-readtable nil)))
    (set-macro-character #\( #'read-list* nil readtable)
    (set-macro-character #\) #'read-close* nil readtable)
    (set-macro-character #\" #'read-string* nil readtable)
    (dolist (char '(#\' #\` #\,))
      (set-macro-character char #'refuse-quote nil readtable))
    (set-macro-character #\# #'read-hash* t readtable)
    (set-macro-character #\: #'read-keyword* t readtable)
    readtable)
  "The standard readtable with every form that is not data refused and keywords kept
out of the KEYWORD package.")

(defvar *scratch-count* (list 0))

(defun call-with-scratch-package (function)
  "Call FUNCTION with a fresh package holding only NIL and T, deleted afterwards, so that
the symbols of a snapshot are interned nowhere that outlives the read."
  (let ((package (make-package (format nil "SWIMMY-NOTIFIER-PRODUCER.SNAPSHOT-~d"
                                       (sb-ext:atomic-incf (car *scratch-count*)))
                               :use nil)))
    (unwind-protect
         (progn (import (list nil t) package)
                (funcall function package))
      (delete-package package))))

(defun reader-failure (condition stream)
  "What the merge's reader would say where SBCL's reader stopped with CONDITION."
  (let ((innermost (first *open*)))
    (if (and (typep condition 'end-of-file) innermost)
        (refuse (cdr innermost) (if (eq (car innermost) :list)
                                    "unbalanced '(': the list is never closed"
                                    "unterminated string"))
        (refuse (file-position stream) "~a"
                (one-line (if (typep condition 'simple-condition)
                              (apply #'format nil (simple-condition-format-control condition)
                                     (simple-condition-format-arguments condition))
                              (princ-to-string condition)))))))

(defun skip-blank (stream)
  "Skip whitespace and ; comments; the next character, or NIL at the end."
  (loop for char = (peek-char nil stream nil nil)
        do (cond ((null char) (return nil))
                 ((char= char #\;) (loop for c = (read-char stream nil nil)
                                         until (or (null c) (char= c #\Newline))))
                 ((member char '(#\Space #\Tab #\Newline #\Return #\Page #.(code-char 11)))
                  (read-char stream))
                 (t (return char)))))

(defun read-datum (text)
  "The one datum of TEXT, or a SYNTAX-PROBLEM."
  (call-with-scratch-package
   (lambda (package)
     (with-input-from-string (stream text)
       (with-standard-io-syntax
         (let ((*read-eval* nil)
               (*read-default-float-format* 'double-float) ; as the merge reads "1.5"
               (*readtable* *snapshot-readtable*)
               (*package* package)
               (*depth* 0)
               (*open* nil))
           (handler-bind ((error (lambda (condition)
                                   ;; A package this image lacks: the symbol, uninterned.
                                   (let ((unintern (find-restart 'unintern condition)))
                                     (when unintern (invoke-restart unintern)))
                                   (unless (typep condition 'syntax-problem)
                                     (reader-failure condition stream)))))
             (when (null (skip-blank stream))
               (refuse nil "no datum: the input is empty"))
             (let ((datum (read stream t nil)))
               (let ((next (skip-blank stream))
                     (at (file-position stream)))
                 (when next
                   (unless (char= next #\() ; any other datum is read first, as the merge does
                     (read stream t nil))
                   (refuse at "text after the datum")))
               datum))))))))

(defun read-snapshot (path name)
  "The datum of the snapshot file PATH (shown as NAME); signals UNUSABLE-SNAPSHOT."
  (multiple-value-bind (text problem) (decode-snapshot (read-regular-octets path name +max-bytes+))
    (unless text
      (unusable "unreadable" "~a: ~a" name problem))
    (handler-case (read-datum text)
      (syntax-problem (problem)
        (let ((offset (problem-offset problem)))
          (unusable "unreadable" "~a: ~a~a" name (problem-message problem)
                    (if offset (position-text text offset #\Newline) "")))))))
