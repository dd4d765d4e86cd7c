// Command goupstream is a payments API written the way Go services usually are: net/http and
// encoding/json from the standard library, nothing else. It decodes the charge body into a struct
// (encoding/json matches keys case-insensitively and ignores bytes after the first document) and
// answers with what it read, so tests can compare the amount it would charge with the amount the
// capgate sidecar judged.
//
// It listens on 127.0.0.1 on a free port and prints "listening <host:port>" on stdout.
package main

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
)

type charge struct {
	Amount int64 `json:"amount"`
}

type echo struct {
	Method          string              `json:"method"`
	Path            string              `json:"path"`
	Query           string              `json:"query"`
	Headers         map[string][]string `json:"headers"`
	BodyBytes       int                 `json:"bodyBytes"`
	Body            []byte              `json:"body"`
	JSONAmount      *int64              `json:"jsonAmount"`
	JSONError       string              `json:"jsonError,omitempty"`
	FormAmount      string              `json:"formAmount"`
	InflatedAmount  *int64              `json:"inflatedAmount"`
	ContentEncoding string              `json:"contentEncoding"`
}

func decode(raw []byte) (*int64, string) {
	var c charge
	// json.NewDecoder, as most handlers do: it reads the first document and ignores the rest.
	if err := json.NewDecoder(bytes.NewReader(raw)).Decode(&c); err != nil {
		return nil, err.Error()
	}
	return &c.Amount, ""
}

func handle(w http.ResponseWriter, r *http.Request) {
	raw, err := io.ReadAll(io.LimitReader(r.Body, 8<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	out := echo{Method: r.Method, Path: r.URL.EscapedPath(), Query: r.URL.RawQuery, Headers: r.Header,
		BodyBytes: len(raw), Body: raw, ContentEncoding: r.Header.Get("Content-Encoding")}
	out.JSONAmount, out.JSONError = decode(raw)
	if strings.EqualFold(out.ContentEncoding, "gzip") {
		if zr, err := gzip.NewReader(bytes.NewReader(raw)); err == nil {
			if inflated, err := io.ReadAll(io.LimitReader(zr, 8<<20)); err == nil {
				out.InflatedAmount, _ = decode(inflated)
			}
		}
	}
	// What a handler using r.FormValue would charge: the query and, for a form body, the form.
	r.Body = io.NopCloser(bytes.NewReader(raw))
	out.FormAmount = r.FormValue("amount")
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(out)
}

func main() {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Printf("listening %s\n", listener.Addr())
	if err := http.Serve(listener, http.HandlerFunc(handle)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
