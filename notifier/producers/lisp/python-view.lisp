;;;; The data read from a snapshot as the merge (Python) sees it: which lists are alists,
;;;; how keys are looked up, and how a value is quoted in a reason (Python's repr, as
;;;; `notifier.sexp.quote` gives it), so that both sides write the same reason.

(in-package #:swimmy-notifier-producer)

(defconstant +quote-chars+ 40 "Most characters of a value a reason quotes.")

(defvar *repr-buffer* nil
  "While quoting: the string written so far, which grows no further than is needed.")

(defun spend ()
  "Stop writing (throw to ENOUGH) once the quote is sure to be cut."
  (when (and *repr-buffer* (> (length *repr-buffer*) (1+ +quote-chars+)))
    (throw 'enough nil)))

(defun symbol-like-p (x)
  "A symbol in the merge's view: NIL and T are not (they are None and True)."
  (or (keyword-token-p x) (and (symbolp x) (not (member x '(nil t))))))

(defun symbol-name* (x)
  (if (keyword-token-p x) (keyword-token-name x) (symbol-name x)))

(defun key-text (key)
  "A key's name as printed with *PRINT-CASE* :DOWNCASE, without package."
  (let ((name (symbol-name* key)))
    (if (string= name (string-upcase name)) (string-downcase name) name)))

(defun normalize-key (text)
  "The form under which keys match: package, case and -/_ ignored."
  (substitute #\_ #\- (string-downcase (subseq text (1+ (or (position #\: text :from-end t) -1))))))

(defun alist-p (x)
  "A non-empty proper list whose every element is a cons with a symbol car."
  (and (consp x) (null (cdr (last x)))
       (every (lambda (entry) (and (consp entry) (symbol-like-p (car entry)))) x)))

(defun lookup (alist name)
  "The value of NAME in ALIST, as the merge looks it up: the first entry printed exactly
NAME, else the first whose key matches it in any package, case or -/_ spelling."
  (let ((entry (or (find name alist :key (lambda (e) (key-text (car e))) :test #'string=)
                   (find (normalize-key name) alist
                         :key (lambda (e) (normalize-key (key-text (car e))))
                         :test #'string=))))
    (cdr entry)))

;;; Python's repr

(defun printable-p (char)
  "Python's str.isprintable for one character."
  (let ((code (char-code char)))
    (if (< code 128)
        (<= 32 code 126)
        (not (member (sb-unicode:general-category char) '(:cc :cf :cs :co :cn :zl :zp :zs))))))

(defun write-python-string (string out)
  (let ((quote (if (and (find #\' string) (not (find #\" string))) #\" #\')))
    (write-char quote out)
    (loop for char across string
          for code = (char-code char)
          do (spend)
             (cond ((or (char= char quote) (char= char #\\)) (write-char #\\ out) (write-char char out))
                   ((char= char #\Tab) (write-string "\\t" out))
                   ((char= char #\Newline) (write-string "\\n" out))
                   ((char= char #\Return) (write-string "\\r" out))
                   ((printable-p char) (write-char char out))
                   ((< code #x100) (format out "\\x~(~2,'0x~)" code))
                   ((< code #x10000) (format out "\\u~(~4,'0x~)" code))
                   (t (format out "\\U~(~8,'0x~)" code))))
    (write-char quote out)))

(defun python-string-repr (string)
  (with-output-to-string (out) (write-python-string string out)))

(defun shortest-digits (x)
  "The shortest decimal digits that read back as X (a positive float), and the position
of the decimal point relative to them (\"15\" and 1 for 1.5)."
  (let* ((printed (let ((*read-default-float-format* (type-of x)))
                    (prin1-to-string x)))
         (marker (position-if (lambda (c) (find c "edfsl" :test #'char-equal)) printed))
         (mantissa (subseq printed 0 marker))
         (exponent (if marker (parse-integer printed :start (1+ marker)) 0))
         (dot (position #\. mantissa))
         (digits (remove #\. mantissa))
         (leading (or (position #\0 digits :test #'char/=) (length digits))))
    (values (string-right-trim "0" (subseq digits leading))
            (+ exponent (- dot leading)))))

(defun python-float-repr (x)
  "repr(x) for a Python float: the shortest digits, fixed notation from 1e-4 to 1e16."
  (cond ((zerop x) (if (minusp (float-sign x)) "-0.0" "0.0"))
        ((minusp x) (concatenate 'string "-" (python-float-repr (- x))))
        (t (multiple-value-bind (digits point) (shortest-digits x)
             (let ((n (length digits)))
               (cond ((<= -3 point 0)
                      (format nil "0.~a~a" (make-string (- point) :initial-element #\0) digits))
                     ((< 0 point n)
                      (format nil "~a.~a" (subseq digits 0 point) (subseq digits point)))
                     ((<= n point 16)
                      (format nil "~a~a.0" digits (make-string (- point n) :initial-element #\0)))
                     (t (let ((e (1- point)))
                          (format nil "~a~:[.~a~;~*~]e~:[+~;-~]~2,'0d" (char digits 0)
                                  (= n 1) (subseq digits 1) (minusp e) (abs e))))))))))

(defun python-symbol-token (x)
  "The token notifier.sexp.symbol_token prints for a symbol."
  (flet ((name-token (name)
           (let ((lower (string-downcase name)))
             (if (and (string= name (string-upcase name))
                      (plusp (length lower))
                      (find (char lower 0) "abcdefghijklmnopqrstuvwxyz_*")
                      (every (lambda (c) (find c "abcdefghijklmnopqrstuvwxyz0123456789_*.+/<>=!?%&-"))
                             lower)
                      (not (member lower '("t" "nil") :test #'string=)))
                 lower
                 (with-output-to-string (out)
                   (write-char #\| out)
                   (loop for c across name
                         do (when (find c "|\\") (write-char #\\ out))
                            (write-char c out))
                   (write-char #\| out))))))
    (cond ((keyword-token-p x) (concatenate 'string ":" (name-token (keyword-token-name x))))
          ((let ((package (symbol-package x)))
             (and package (not (search "SWIMMY-NOTIFIER-PRODUCER.SNAPSHOT-" (package-name package)))))
           (concatenate 'string (name-token (package-name (symbol-package x))) "::"
                        (name-token (symbol-name x))))
          (t (name-token (symbol-name x))))))

(defun write-python-repr (x out python-view)
  "Python's repr of X: the Python view (alists as dicts) when PYTHON-VIEW, else the Lisp
view (inside a DottedList)."
  (flet ((items (list view)
           (loop for (item . more) on list
                 do (spend)
                    (write-python-repr item out view)
                    (when more (write-string ", " out)))))
    (cond ((null x) (write-string "None" out))
          ((eq x t) (write-string "True" out))
          ((lisp-false-p x) (write-string "False" out))
          ((integerp x) (format out "~d" x))
          ((typep x 'ratio) (format out "Fraction(~d, ~d)" (numerator x) (denominator x)))
          ((floatp x) (write-string (python-float-repr x) out))
          ((stringp x) (write-python-string x out))
          ((symbol-like-p x)
           (write-string "Symbol(" out)
           (write-python-string (python-symbol-token x) out)
           (write-string ")" out))
          ((and (consp x) (cdr (last x)))
           (write-string "DottedList([" out)
           (items (loop for rest on x while (consp rest) collect (car rest)) nil)
           (write-string "], " out)
           (write-python-repr (cdr (last x)) out nil)
           (write-string ")" out))
          ((and python-view (alist-p x))
           (write-string "{" out)
           (let ((seen '()))
             (loop for (key . value) in x
                   for text = (key-text key)
                   unless (member text seen :test #'string=)
                     do (spend)
                        (when seen (write-string ", " out))
                        (push text seen)
                        (write-python-string text out)
                        (write-string ": " out)
                        (write-python-repr value out t)))
           (write-string "}" out))
          ((consp x)
           (write-string "[" out)
           (items x python-view)
           (write-string "]" out))
          (t (write-python-string (princ-to-string x) out)))))

(defun python-quote (value)
  "notifier.sexp.quote: Python's repr of VALUE, cut to +QUOTE-CHARS+ characters with an
ellipsis. Stops writing once the cut is certain, whatever the size of VALUE."
  (let ((buffer (make-array 64 :element-type 'character :adjustable t :fill-pointer 0)))
    (with-output-to-string (out buffer)
      (let ((*repr-buffer* buffer))
        (catch 'enough
          (write-python-repr value out t))))
    (if (<= (length buffer) +quote-chars+)
        (coerce buffer 'simple-string)
        (concatenate 'string (subseq buffer 0 (1- +quote-chars+)) "…"))))
