// joinload: ghz's open-loop runner for Admission.Join with a fresh user, and a user token of its own,
// on every call (ghz 0.93 itself sends one metadata object for all calls). The join-storm benchmark and
// `townhall loadtest --ghz` run it; its JSON report is ghz's.
package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/bojand/ghz/printer"
	"github.com/bojand/ghz/runner"
	"google.golang.org/grpc/metadata"
)

func b64(data []byte) string { return base64.RawURLEncoding.EncodeToString(data) }

func main() {
	var (
		proto       = flag.String("proto", "", "admission.proto")
		importPaths = flag.String("import-paths", "", "proto import path")
		data        = flag.String("d", "", "request JSON (an object, or an array used round-robin)")
		key         = flag.String("key", os.Getenv("JOINLOAD_KEY"), "user-token signing key, KID=SECRET (auth.keys[0]; default $JOINLOAD_KEY)")
		issuer      = flag.String("iss", "", "iss claim of every token (auth.issuer), if any")
		audience    = flag.String("aud", "", "aud claim of every token (auth.audience), if any")
		firstUser   = flag.Int64("first-user", 1, "user id of the first call; call n is first-user + n")
		grants      = flag.String("grants", "subscribe", "comma-separated grants in every token")
		ttl         = flag.Duration("ttl", time.Hour, "token lifetime")
		rps         = flag.Uint("rps", 100, "calls started per second (open loop with -async)")
		duration    = flag.Duration("z", 10*time.Second, "how long to offer the load")
		connections = flag.Uint("connections", 4, "HTTP/2 connections")
		concurrency = flag.Uint("c", 50, "workers")
		skip        = flag.Uint("skip-first", 0, "calls left out of the report (warm-up)")
		timeout     = flag.Duration("t", 10*time.Second, "per-call deadline")
		out         = flag.String("o", "", "JSON report file")
		ca          = flag.String("cacert", "", "CA certificate (TLS); none: plaintext")
		cert        = flag.String("cert", "", "client certificate (mutual TLS)")
		certKey     = flag.String("cert-key", "", "client key (mutual TLS)")
		cname       = flag.String("cname", "", "server name to expect (TLS)")
	)
	flag.Parse()
	if flag.NArg() != 1 || *key == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "usage: JOINLOAD_KEY=KID=SECRET joinload -o report.json [flags] host:port")
		os.Exit(2)
	}
	kid, secret, ok := strings.Cut(*key, "=")
	if !ok {
		fmt.Fprintln(os.Stderr, "joinload: -key must be KID=SECRET")
		os.Exit(2)
	}
	header := b64([]byte(fmt.Sprintf(`{"alg":"HS256","kid":%q,"typ":"JWT"}`, kid)))
	quoted := make([]string, 0)
	for _, g := range strings.Split(*grants, ",") {
		quoted = append(quoted, fmt.Sprintf("%q", strings.TrimSpace(g)))
	}
	grantList := strings.Join(quoted, ",")
	extra := ""
	if *audience != "" {
		extra += fmt.Sprintf(`,"aud":%q`, *audience)
	}
	if *issuer != "" {
		extra += fmt.Sprintf(`,"iss":%q`, *issuer)
	}
	// A new user on every call, as in a storm of first joins: the server verifies every token.
	token := func(cd *runner.CallData) (*metadata.MD, error) {
		now := time.Now().Unix()
		claims := fmt.Sprintf(`{"exp":%d,"grants":[%s],"iat":%d,"sub":"%d"%s}`,
			now+int64(ttl.Seconds()), grantList, now, *firstUser+cd.RequestNumber, extra)
		body := header + "." + b64([]byte(claims))
		mac := hmac.New(sha256.New, []byte(secret))
		mac.Write([]byte(body))
		md := metadata.Pairs("authorization", "Bearer "+body+"."+b64(mac.Sum(nil)))
		return &md, nil
	}
	options := []runner.Option{
		runner.WithProtoFile(*proto, []string{*importPaths}),
		runner.WithDataFromJSON(*data),
		runner.WithMetadataProvider(token),
		runner.WithAsync(true),
		runner.WithRPS(*rps),
		runner.WithRunDuration(*duration),
		runner.WithConnections(*connections),
		runner.WithConcurrency(*concurrency),
		runner.WithSkipFirst(*skip),
		runner.WithTimeout(*timeout),
	}
	if *ca == "" {
		options = append(options, runner.WithInsecure(true))
	} else {
		options = append(options, runner.WithRootCertificate(*ca))
		if *cert != "" {
			options = append(options, runner.WithCertificate(*cert, *certKey))
		}
		if *cname != "" {
			options = append(options, runner.WithServerNameOverride(*cname))
		}
	}
	report, err := runner.Run("townhall.v1.Admission.Join", flag.Arg(0), options...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "joinload:", err)
		os.Exit(1)
	}
	file, err := os.Create(*out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "joinload:", err)
		os.Exit(1)
	}
	defer file.Close()
	if err := (&printer.ReportPrinter{Out: file, Report: report}).Print("json"); err != nil {
		fmt.Fprintln(os.Stderr, "joinload:", err)
		os.Exit(1)
	}
}
