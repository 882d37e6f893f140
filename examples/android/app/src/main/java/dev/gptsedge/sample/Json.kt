package dev.gptsedge.sample

/**
 * Just enough JSON to read tokenizer.json and config.json without a library, so this file (and
 * the tokenizer on top of it) also compiles and runs on a desktop JVM for checks.
 * Objects become LinkedHashMap<String, Any?>, arrays List<Any?>, numbers Double, plus String,
 * Boolean and null.
 */
object Json {
    fun parse(text: String): Any? {
        val p = Parser(text)
        p.skipWs()
        val v = p.value()
        p.skipWs()
        if (p.i != text.length) throw IllegalArgumentException("JSON: trailing data at offset ${p.i}")
        return v
    }

    private class Parser(val s: String) {
        var i = 0

        fun skipWs() {
            while (i < s.length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++
        }

        fun fail(what: String): Nothing = throw IllegalArgumentException("JSON: expected $what at offset $i")

        fun value(): Any? {
            if (i >= s.length) fail("a value")
            return when (s[i]) {
                '{' -> obj()
                '[' -> arr()
                '"' -> str()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> num()
            }
        }

        fun literal(word: String, v: Any?): Any? {
            if (!s.startsWith(word, i)) fail(word)
            i += word.length
            return v
        }

        fun obj(): Map<String, Any?> {
            val m = LinkedHashMap<String, Any?>()
            i++
            skipWs()
            if (i < s.length && s[i] == '}') { i++; return m }
            while (true) {
                skipWs()
                if (i >= s.length || s[i] != '"') fail("a key")
                val k = str()
                skipWs()
                if (i >= s.length || s[i] != ':') fail("':'")
                i++
                skipWs()
                m[k] = value()
                skipWs()
                if (i < s.length && s[i] == ',') { i++; continue }
                if (i < s.length && s[i] == '}') { i++; return m }
                fail("',' or '}'")
            }
        }

        fun arr(): List<Any?> {
            val a = ArrayList<Any?>()
            i++
            skipWs()
            if (i < s.length && s[i] == ']') { i++; return a }
            while (true) {
                skipWs()
                a.add(value())
                skipWs()
                if (i < s.length && s[i] == ',') { i++; continue }
                if (i < s.length && s[i] == ']') { i++; return a }
                fail("',' or ']'")
            }
        }

        fun str(): String {
            val sb = StringBuilder()
            i++ // opening quote
            while (true) {
                if (i >= s.length) fail("a closing quote")
                val c = s[i++]
                when (c) {
                    '"' -> return sb.toString()
                    '\\' -> {
                        if (i >= s.length) fail("an escape")
                        when (val e = s[i++]) {
                            '"', '\\', '/' -> sb.append(e)
                            'b' -> sb.append('\b')
                            'f' -> sb.append('\u000C')
                            'n' -> sb.append('\n')
                            'r' -> sb.append('\r')
                            't' -> sb.append('\t')
                            // Surrogate pairs arrive as two \u escapes and join up in the builder.
                            'u' -> {
                                if (i + 4 > s.length) fail("4 hex digits")
                                sb.append(s.substring(i, i + 4).toInt(16).toChar())
                                i += 4
                            }
                            else -> fail("a valid escape")
                        }
                    }
                    else -> sb.append(c)
                }
            }
        }

        fun num(): Double {
            val start = i
            while (i < s.length && (s[i] in "+-.eE" || s[i] in '0'..'9')) i++
            if (start == i) fail("a value")
            return s.substring(start, i).toDouble()
        }
    }
}
